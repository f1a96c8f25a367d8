"""Stage 5 v2: train the property-score CNN on the algorithm-2 scores (all_scores_v2.csv), write its scores of
every filtered image (all_scores_v2_cnn.csv, the labels v3 trains on, and compare/all_scores_v2_vs_cnn.csv), and
with --train-generator also train the v1 generator through the CNN (upstream's failed v2 variant).

The CNN's best epoch (lowest validation MSE without background_std) is written as
stylegan_modified/stylegan_gen_fine_tuned_v2_cnn.pth, the published name; its run folder
stylegan_modified/fine_tuning_v2_cnn/ holds train_log_v2_cnn.csv, train_log_v2_cnn_val_log.csv and the resume
record. With --property-cnn PATH (e.g. the published file) nothing is trained: only the two CSVs are written. The
generator phase writes stylegan_modified/stylegan_gen_fine_tuned_v2.pth (its best step group) and
stylegan_modified/fine_tuning_v2/. Files of these names that this run did not write are never overwritten
unless --overwrite is given; finished phases are skipped; --resume continues an interrupted one exactly.
--compat upstream: upstream's LR curves (zero-LR epochs), dropout on while scoring, and in the generator phase
the CNN trained along in train mode and v1's dense0 re-randomised. Several GPUs or machines: start it with torchrun
(docs/scale-out.md); --batch-size and --gen-batch-size are then the batches of a step over all processes.
"""
from __future__ import annotations

from ohlora.cli import add_common_options, make_parser, positive_int, run
from stylegan_modified.fine_tuning_v2 import fine_tune_v2
from stylegan_modified.property_cnn_training import PropertyCnnSettings
from stylegan_modified.training_cli import add_trainer_options, report, second_signal_exits, start
from stylegan_modified.v2_generator_training import V2GeneratorSettings

EXAMPLES = '''
  # train the property CNN (at most 200 epochs, early stopping after 20 without improvement) and write the CSVs
  python stylegan_and_segmentation/run_stylegan_fine_tuning_v2.py
  # continue after Ctrl-C; or raise the cap of a run that reached it
  python stylegan_and_segmentation/run_stylegan_fine_tuning_v2.py --resume
  python stylegan_and_segmentation/run_stylegan_fine_tuning_v2.py --resume --max-epochs 300
  # only the CSVs, from the published CNN (downloaded to stylegan_modified/ if absent: pass its path)
  python stylegan_and_segmentation/run_stylegan_fine_tuning_v2.py \\
      --property-cnn stylegan_modified/stylegan_gen_fine_tuned_v2_cnn.pth
  # also upstream's generator experiment through the frozen CNN, from the v1 generator
  python stylegan_and_segmentation/run_stylegan_fine_tuning_v2.py --train-generator --max-groups 200
  # a second run beside a downloaded published CNN: its own folder; mixed precision
  python stylegan_and_segmentation/run_stylegan_fine_tuning_v2.py --outdir runs/v2 --amp
  # on the 2 GPUs of this machine (16 images per step in all, 8 per GPU)
  torchrun --standalone --nproc_per_node 2 stylegan_and_segmentation/run_stylegan_fine_tuning_v2.py
'''


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    cnn = parser.add_argument_group('property CNN')
    cnn.add_argument('--max-epochs', type=positive_int, default=200,
                     help='epoch cap, the run\'s total (also with --resume; upstream had none and stopped after 128) '
                          '(default: 200)')
    cnn.add_argument('--patience', type=positive_int, default=20,
                     help='stop this many epochs after the best one (default: 20, as upstream)')
    cnn.add_argument('--eval-batch-size', type=positive_int, default=16,
                     help='images per validation / scoring batch; changes nothing beyond float rounding '
                          '(default: 16; upstream validated in 4s)')
    cnn.add_argument('--scores', default=None, metavar='CSV',
                     help='property scores (default: segmentation/property_score_results/all_scores_v2.csv, '
                          'algorithm 2); images are taken from stylegan/synthesize_results_filtered/ by img_no')
    cnn.add_argument('--property-cnn', default=None, metavar='PATH',
                     help='use this CNN file (e.g. the published stylegan_gen_fine_tuned_v2_cnn.pth) instead of '
                          'training one: only the CSVs are written (and --train-generator uses it)')
    generator = parser.add_argument_group('generator through the CNN (opt-in; upstream\'s failed variant)')
    generator.add_argument('--train-generator', action='store_true',
                           help='after the CNN, train the v1 generator through it (writes '
                                'stylegan_gen_fine_tuned_v2.pth)')
    generator.add_argument('--v1-weights', default=None, metavar='PATH',
                           help='v1 generator to start from (default: stylegan_modified/stylegan_gen_fine_tuned_v1.pth,'
                                ' downloaded if absent)')
    generator.add_argument('--max-groups', type=positive_int, default=500,
                           help='step-group cap, the generator run\'s total (upstream had none) (default: 500)')
    generator.add_argument('--gen-patience', type=positive_int, default=100,
                           help='stop this many step groups after the best one (default: 100, as upstream)')
    generator.add_argument('--steps-per-group', type=positive_int, default=50,
                           help='steps of one step group (default: 50, as upstream)')
    generator.add_argument('--gen-batch-size', type=positive_int, default=16,
                           help='z per generator step over all processes (default: 16, as upstream)')
    parser.add_argument('--outdir', default=None, metavar='DIR',
                        help='where the checkpoints and run folders go (default: <root>/stylegan_modified)')
    add_trainer_options(parser, amp_detail='autocast + GradScaler',
                        checkpoint_every_help='checkpoint also every N steps (default: 0: at the end of each epoch / '
                                              'step group; Ctrl-C and SIGTERM always write one)',
                        resume_help='continue (or extend) the interrupted phase')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace files of the output names that this run did not write (e.g. a downloaded CNN '
                             'or upstream\'s all_scores_v2_cnn.csv)')
    add_common_options(parser, batch_size=16, batch_size_help='images per CNN training step over all processes')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    layout, device, ctx = start(args)
    device = str(device)
    common = dict(seed=args.seed, device=device, checkpoint_every=args.checkpoint_every, amp=args.amp,
                  tf32=args.tf32, compat=args.compat, no_progress=args.no_progress)
    cnn_settings = PropertyCnnSettings(max_epochs=args.max_epochs, patience=args.patience,
                                       batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                                       workers=args.workers, **common)
    generator_settings = None
    if args.train_generator:
        generator_settings = V2GeneratorSettings(max_groups=args.max_groups, patience=args.gen_patience,
                                                 steps_per_group=args.steps_per_group,
                                                 batch_size=args.gen_batch_size, **common)
    with second_signal_exits():
        result = fine_tune_v2(layout, cnn_settings, generator_settings, scores_path=args.scores,
                              property_cnn_path=args.property_cnn, v1_weights_path=args.v1_weights,
                              outdir=args.outdir, resume=args.resume, overwrite=args.overwrite, ctx=ctx)
    stopped = []
    if result.interrupted:
        phase = result.generator if result.generator is not None else result.cnn
        stopped.append(f'stopped by {result.interrupted} at {phase.position}; the checkpoint in {phase.run_folder} '
                       'is complete; continue with --resume')
    report(ctx, summary(result), stopped)


def summary(result) -> list[str]:
    lines = []
    cnn = result.cnn
    if cnn is None:
        lines.append(f'property CNN: {result.cnn_file} (given; not trained)')
    elif cnn.status != 'interrupted':
        how = {'already finished': 'already trained, nothing to do', 'stopped early': 'early stopping',
               'finished': 'reached --max-epochs'}[cnn.status]
        restored = f'; restored the missing {cnn.output.name}' if cnn.restored else ''
        lines.append(f'property CNN: {cnn.epochs} epochs ({how}{restored}); best epoch {cnn.best_epoch} '
                     f'(validation MSE without background_std {cnn.best_value:.4f}) in {cnn.output}; logs in '
                     f'{cnn.run_folder}')
        for name, metrics in cnn.best_metrics.items():
            lines.append(f'  {name:16s} r {metrics["r"]:6.3f}   MAE {metrics["mae"]:.3f}')
    scoring = result.scoring
    if scoring is not None:
        files = f'{scoring.outputs[0]} and {scoring.outputs[1]}'
        done = f'{files} are up to date' if scoring.status == 'up to date' else f'wrote {files}'
        lines.append(f'scores of {scoring.images} images: {done}')
    generator = result.generator
    if generator is not None and generator.status != 'interrupted':
        how = {'already finished': 'already trained, nothing to do', 'stopped early': 'early stopping',
               'finished': 'reached --max-groups'}[generator.status]
        lines.append(f'v2 generator: {generator.groups} step groups ({how}); best group {generator.best_group} '
                     f'(mean loss {generator.best_loss:.4f}) in {generator.output}; log in {generator.run_folder}')
    return lines


if __name__ == '__main__':
    run(main)
