"""Stage 5 v1: fine-tune GenForce's StyleGAN (celeba_partial-256x256) into the conditional v1 G and D, with the seven
property scores (stage 4, algorithm 1: all_scores.csv) as labels and the stage-2 filtered images as data.

Writes stylegan_modified/stylegan_gen_fine_tuned_v1.pth and stylegan_dis_fine_tuned_v1.pth (plain state_dicts under
the published names that v2, v3 and stage 6 --model v1 read) every epoch and every --checkpoint-every steps, and the
run folder stylegan_modified/fine_tuning_v1/ (training_options.json, train_log.csv, resume_record.pt,
written_files.json, snapshots/). --epochs is the total: --resume continues an interrupted run, or extends a finished
one, exactly. A file of a published name that this run did not write (e.g. a downloaded v1) is never overwritten
unless --overwrite is given. Ctrl-C or SIGTERM stops after the current step with a complete checkpoint. Upstream's
v1 has no behaviour to reproduce beyond the defaults (PIPELINE.md §13), so --compat upstream changes nothing.
Several GPUs or machines: start it with torchrun (docs/scale-out.md); --batch-size is then the batch of a step over
all processes.
"""
from __future__ import annotations

from ohlora.cli import add_common_options, make_parser, positive_int, run
from stylegan_modified.fine_tuning import INITS, FineTuningSettings, fine_tune
from stylegan_modified.training_cli import (add_trainer_options, add_workers_option, non_negative_int, report,
                                            second_signal_exits, start)

EXAMPLES = '''
  # 39 epochs as upstream's published v1 (the GenForce zoo file is downloaded to stylegan/ if absent)
  python stylegan_and_segmentation/run_stylegan_fine_tuning.py --epochs 39
  # continue after Ctrl-C, or extend the finished run to 50 epochs in all
  python stylegan_and_segmentation/run_stylegan_fine_tuning.py --epochs 50 --resume
  # a second run beside a downloaded published v1: its own folder (the published files are never overwritten)
  python stylegan_and_segmentation/run_stylegan_fine_tuning.py --epochs 5 --outdir runs/v1_warm --init warm
  # your own zoo file and scores, mixed precision, fewer snapshots
  python stylegan_and_segmentation/run_stylegan_fine_tuning.py --epochs 5 --weights stylegan_celeba_partial256.pth \\
      --scores my_scores.csv --amp --snapshot-every 100
  # on the 4 GPUs of this machine, 16 images per step in all (4 per GPU); --resume the same way
  torchrun --standalone --nproc_per_node 4 stylegan_and_segmentation/run_stylegan_fine_tuning.py --epochs 39
'''


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    parser.add_argument('--epochs', type=positive_int, required=True,
                        help='epochs in all (the total, also with --resume; upstream\'s published v1: about 39)')
    parser.add_argument('--weights', default=None, metavar='PATH',
                        help='GenForce zoo checkpoint to start from (default: stylegan/stylegan_model.pth, '
                             'downloaded if absent)')
    parser.add_argument('--scores', default=None, metavar='CSV',
                        help='property scores (default: segmentation/property_score_results/all_scores.csv, '
                             'algorithm 1); images are taken from stylegan/synthesize_results_filtered/ by img_no')
    parser.add_argument('--outdir', default=None, metavar='DIR',
                        help='where the checkpoints and the run folder go (default: <root>/stylegan_modified)')
    parser.add_argument('--init', choices=INITS, default='upstream',
                        help="'upstream': dense0.weight, label_weight and layer14 random (seeded); 'warm': the "
                             'pretrained dense0 weight in the z columns, zeros for the label (default: upstream)')
    parser.add_argument('--style-mixing-prob', type=float, default=0.9,
                        help='style-mixing probability of the training G calls (default: 0.9, as upstream)')
    add_workers_option(parser)
    parser.add_argument('--snapshot-every', type=non_negative_int, default=10,
                        help='monitoring grid after every N-th batch of an epoch, 0: none (default: 10, as upstream)')
    parser.add_argument('--snapshot-z', type=positive_int, default=10, help='rows (seeded z) of the grid (default: 10)')
    parser.add_argument('--snapshot-size', type=positive_int, default=128,
                        help='pixel size of a grid cell (default: 128; the images are 256)')
    add_trainer_options(parser, workers=False, amp_detail='autocast + GradScaler; R1 stays float32',
                        checkpoint_every_help='checkpoint also every N steps (default: 0, at the end of each epoch '
                                              'only; a checkpoint writes about 0.5 GB at full size, and '
                                              'Ctrl-C/SIGTERM always write one)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace published-name files that this run did not write (e.g. a downloaded v1)')
    add_common_options(parser, batch_size=16, batch_size_help='images per step over all processes (each process\'s '
                                                              'share at most 16 or a multiple of 16)')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    layout, device, ctx = start(args)
    settings = FineTuningSettings(
        epochs=args.epochs, batch_size=args.batch_size, workers=args.workers, seed=args.seed, device=str(device),
        init=args.init, style_mixing_prob=args.style_mixing_prob, snapshot_every=args.snapshot_every,
        snapshot_z=args.snapshot_z, snapshot_size=args.snapshot_size, checkpoint_every=args.checkpoint_every,
        amp=args.amp, tf32=args.tf32, compat=args.compat, no_progress=args.no_progress)
    with second_signal_exits():
        result = fine_tune(layout, settings, weights_path=args.weights, scores_path=args.scores, outdir=args.outdir,
                           resume=args.resume, overwrite=args.overwrite, ctx=ctx)
    if result.status == 'interrupted':
        report(ctx, stopped=result.lines())
    else:
        report(ctx, result.lines())


if __name__ == '__main__':
    run(main)
