"""Stage 1: sample faces from GenForce's pretrained StyleGAN (celeba_partial-256x256), or import the published set."""
from __future__ import annotations

from ohlora.cli import add_common_options, add_scale_options, make_parser, request_from, run
from stylegan.stage1 import Stage1Request, run_stage1

EXAMPLES = '''
  # 10,000 images into stylegan/synthesize_results/ (downloads the GenForce zoo file if needed)
  python stylegan_and_segmentation/run_original_generator.py
  # a few images from a checkpoint you already have, into another root
  python stylegan_and_segmentation/run_original_generator.py --weights stylegan_celeba_partial256.pth --num 6 --root runs/demo
  # the published 10,000 images that the shipped hand labels belong to
  python stylegan_and_segmentation/run_original_generator.py --published
  # upstream-like sampling: 90 % style mixing (drawn per image from the seed)
  python stylegan_and_segmentation/run_original_generator.py --compat upstream
  # 4 GPUs of one machine: each renders a quarter, rank 0 then writes the meta and the z record
  torchrun --standalone --nproc_per_node 4 -- stylegan_and_segmentation/run_original_generator.py --num 100000
  # job 3 of 8 independent cluster jobs, then (once all 8 have finished) the merge
  python stylegan_and_segmentation/run_original_generator.py --num 100000 --shard 3/8
  python stylegan_and_segmentation/merge_shards.py --stage 1
'''


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    parser.add_argument('--num', type=int, default=10_000, help='images 0..NUM-1 (default: 10000)')
    parser.add_argument('--weights', default=None, metavar='PATH',
                        help='GenForce zoo checkpoint (default: stylegan/stylegan_model.pth, downloaded if absent)')
    parser.add_argument('--generator-key', choices=['generator', 'generator_smooth'], default='generator',
                        help="checkpoint entry to use (default: 'generator', as Oh-LoRA; GenForce prefers the smooth one)")
    parser.add_argument('--trunc-psi', type=float, default=1.0,
                        help='truncation psi, a finite number (default: 1.0, off, as upstream)')
    parser.add_argument('--trunc-layers', type=int, default=0,
                        help="truncated layers, 0 up to the generator's layer count (default: 0)")
    parser.add_argument('--style-mixing-prob', type=float, default=None,
                        help='per-image style-mixing probability (default: 0; 0.9 with --compat upstream)')
    parser.add_argument('--published', action='store_true',
                        help='download the published 10,000 images instead of sampling')
    add_common_options(parser, batch_size=16)
    add_scale_options(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    report = run_stage1(request_from(Stage1Request, args))
    for line in report.lines():
        print(line)


if __name__ == '__main__':
    run(main)
