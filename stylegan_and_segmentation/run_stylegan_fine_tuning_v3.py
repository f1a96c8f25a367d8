"""Stage 5 v3: train a conditional VAE whose decoder is the v1 generator (the variant upstream adopted), with the
property CNN's scores of the filtered images (all_scores_v2_cnn.csv) as labels; only eyes, mouth and pose are
supervised (through the frozen property CNN), a frozen gender CNN keeps the faces female.

Each epoch ends with upstream's test: the last --test-z encoder means give test z's, each is rendered for every
label of --test-grid and re-measured by the property CNN; a z passes when Pearson r and MAE of eyes, mouth and pose
meet the thresholds (--pass-min-r, --pass-max-mae; upstream's by default). A passing epoch writes
stylegan_modified/stylegan_gen_fine_tuned_v3_ckpt_EEEE_{gen,enc}.pth and its best z as test_z_vector_EEEE.csv (the
files stage 6 reads); the last epoch writes stylegan_gen_fine_tuned_v3.pth and ..._v3_encoder.pth. The run folder
stylegan_modified/fine_tuning_v3/ holds training_options.json, train_log_v3.csv, resume_record.pt and the test
folders inference_test_during_finetuning_v3/epoch_EEEE/. --epochs is the total: --resume continues exactly (also
inside an epoch). Files this run did not write are never overwritten (--overwrite allows it for published ones);
the z CSVs shipped beside the code never. --compat upstream: both frozen CNNs in train mode (dropout), the raw
[-1, 1] image for the gender CNN, upstream's LR curve with zero-LR epochs. Several GPUs or machines: start it
with torchrun (docs/scale-out.md); --batch-size is then the batch of a step over all processes.
"""
from __future__ import annotations

from ohlora.cli import add_common_options, make_parser, positive_int, run
from stylegan_modified.attribute_metrics import UPSTREAM_V3_RULE, V3_TEST_GRID
from stylegan_modified.cvae_training import V3Settings, fine_tune_v3
from stylegan_modified.training_cli import add_trainer_options, non_negative_int, report, second_signal_exits, start
from stylegan_modified.v3_epoch_test import grid_text, parse_attribute_values, parse_grid

EXAMPLES = '''
  # upstream's run: 35 epochs (inputs from earlier stages; v1 G, property CNN and gender CNN downloaded if absent)
  python stylegan_and_segmentation/run_stylegan_fine_tuning_v3.py --epochs 35 --root runs/v3
  # continue after Ctrl-C, or extend the finished run to 40 epochs
  python stylegan_and_segmentation/run_stylegan_fine_tuning_v3.py --epochs 40 --root runs/v3 --resume
  # a faithful rerun: upstream's published labels and upstream's CNN modes and LR curve
  python stylegan_and_segmentation/run_stylegan_fine_tuning_v3.py --epochs 35 --root runs/v3u \\
      --scores all_scores_v2_cnn.csv --compat upstream
  # stop when the epoch loss has not improved for 5 epochs; a quicker test of 10 z; looser mouth rule
  python stylegan_and_segmentation/run_stylegan_fine_tuning_v3.py --epochs 100 --patience 5 --test-z 10 \\
      --pass-min-r mouth=0.8 --pass-max-mae mouth=0.8 --outdir runs/v3_patience
  # on 2 GPUs of this machine, 8 images per step in all (4 per GPU)
  torchrun --standalone --nproc_per_node 2 stylegan_and_segmentation/run_stylegan_fine_tuning_v3.py --epochs 35 \\
      --root runs/v3
  # then generate in stage 6 with a passing epoch (here 12: see passing_z in train_log_v3.csv)
  python stylegan_and_segmentation/run_fine_tuned_generator.py --root runs/v3 \\
      --weights runs/v3/stylegan_modified/stylegan_gen_fine_tuned_v3_ckpt_0012_gen.pth \\
      --z-csv runs/v3/stylegan_modified/test_z_vector_0012.csv
(stylegan_modified/ ships test_z_vector_0005.csv and _0007.csv with the code: a run that could write them is refused, so
 give runs of 6 epochs or more their own --root or --outdir)
'''


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    parser.add_argument('--epochs', type=positive_int, required=True,
                        help='epochs in all (the total, also with --resume; upstream ran 35)')
    parser.add_argument('--patience', type=positive_int, default=None,
                        help='stop when the epoch-mean loss has not improved for N epochs (default: off)')
    parser.add_argument('--v1-weights', default=None, metavar='PATH',
                        help='v1 generator to start from (default: stylegan_modified/stylegan_gen_fine_tuned_v1.pth, '
                             'downloaded if absent)')
    parser.add_argument('--property-cnn', default=None, metavar='PATH',
                        help='v2 property-score CNN (default: stylegan_modified/stylegan_gen_fine_tuned_v2_cnn.pth, '
                             'downloaded if absent)')
    parser.add_argument('--gender-cnn', default=None, metavar='PATH',
                        help='stage-2 gender CNN of fold 0 (default: cnn/models/gender_model_0.pt, downloaded if '
                             'absent)')
    parser.add_argument('--scores', default=None, metavar='CSV',
                        help='labels (default: segmentation/property_score_results/all_scores_v2_cnn.csv, written by '
                             'run_stylegan_fine_tuning_v2.py); images from stylegan/synthesize_results_filtered/')
    parser.add_argument('--outdir', default=None, metavar='DIR',
                        help='where the checkpoints and the run folder go (default: <root>/stylegan_modified)')
    test = parser.add_argument_group('the per-epoch test (defaults: upstream\'s)')
    test.add_argument('--test-z', type=positive_int, default=30,
                      help='test z vectors, from the last encoder means of the epoch (default: 30; at most 100)')
    test.add_argument('--test-grid', default=grid_text(V3_TEST_GRID), metavar='ATTR=V,..;ATTR=V,..',
                      help='labels each test z is rendered with: every combination, the other entries 0 (default: '
                           '%(default)s, 50 labels)')
    defaults_r = ','.join(f'{a}={t.min_r:g}' for a, t in UPSTREAM_V3_RULE.thresholds.items())
    defaults_mae = ','.join(f'{a}={t.max_mae:g}' for a, t in UPSTREAM_V3_RULE.thresholds.items())
    test.add_argument('--pass-min-r', default='', metavar='ATTR=R,..',
                      help=f'minimum Pearson r per attribute, overriding the defaults {defaults_r}')
    test.add_argument('--pass-max-mae', default='', metavar='ATTR=MAE,..',
                      help=f'maximum MAE per attribute (none: no bound), overriding the defaults {defaults_mae}')
    test.add_argument('--test-random', type=non_negative_int, default=30,
                      help='images of random z and labels, with their gender and property scores (default: 30)')
    add_trainer_options(parser, amp_detail='autocast; float16 + GradScaler on CUDA')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace published-name files that this run did not write (e.g. the downloaded '
                             'stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth); never the files shipped with the code')
    add_common_options(parser, batch_size=8, batch_size_help='images per step over all processes (upstream: 8)')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    layout, device, ctx = start(args)
    settings = V3Settings(
        epochs=args.epochs, batch_size=args.batch_size, workers=args.workers, seed=args.seed, device=str(device),
        patience=args.patience, checkpoint_every=args.checkpoint_every, test_z=args.test_z,
        test_grid=parse_grid(args.test_grid), pass_min_r=parse_attribute_values(args.pass_min_r, '--pass-min-r'),
        pass_max_mae=parse_attribute_values(args.pass_max_mae, '--pass-max-mae', allow_none=True),
        test_random=args.test_random, amp=args.amp, tf32=args.tf32, compat=args.compat,
        no_progress=args.no_progress)
    with second_signal_exits():
        result = fine_tune_v3(layout, settings, v1_weights=args.v1_weights, property_cnn=args.property_cnn,
                              gender_cnn=args.gender_cnn, scores_path=args.scores, outdir=args.outdir,
                              resume=args.resume, overwrite=args.overwrite, ctx=ctx)
    if result.status == 'interrupted':
        report(ctx, stopped=[f'stopped by {result.signal} at epoch {result.epoch}, batch {result.batch} (step '
                             f'{result.step}); the checkpoint is complete; continue with --resume'])
    elif result.status == 'already finished':
        restored = f'; restored the missing {", ".join(p.name for p in result.restored)}' if result.restored else ''
        how = ' (stopped early by --patience)' if result.stopped_early else ' (--resume --epochs N to extend it)'
        report(ctx, [f'{result.run_folder} already holds a finished run of {result.epoch} epochs; nothing to '
                     f'do{restored}{how}'])
    else:
        passing = ', '.join(f'{s.epoch} ({s.passing_z} z, best {s.best_z})' for s in result.epochs if s.passing_z)
        finals = ', '.join(str(p) for p in result.outputs)
        early = ' (stopped early by --patience)' if result.stopped_early else ''
        report(ctx, [f'fine-tuned v3 for {result.epoch} epochs{early} ({result.step} steps): {finals}; passing '
                     f'epochs: {passing or "none"}; log and per-epoch tests in {result.run_folder}'])


if __name__ == '__main__':
    run(main)
