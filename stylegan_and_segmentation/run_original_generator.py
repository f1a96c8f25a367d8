"""Stage 1: sample faces from GenForce's pretrained StyleGAN (celeba_partial-256x256), or import the published set."""
from __future__ import annotations

from ohlora.cli import add_common_options, check_float, make_parser, run
from ohlora.devices import disable_tf32, resolve_device
from ohlora.errors import PipelineError
from ohlora.layout import MAX_IMAGES, Layout
from ohlora.records import weights_digest
from ohlora.weights import fetch
from stylegan.checkpoint import load_generator
from stylegan.sampling import SamplingRecipe, check_outputs, existing_images, import_published, sample_images

EXAMPLES = '''
  # 10,000 images into stylegan/synthesize_results/ (downloads the GenForce zoo file if needed)
  python stylegan_and_segmentation/run_original_generator.py
  # a few images from a checkpoint you already have, into another root
  python stylegan_and_segmentation/run_original_generator.py --weights stylegan_celeba_partial256.pth --num 6 --root runs/demo
  # the published 10,000 images that the shipped hand labels belong to
  python stylegan_and_segmentation/run_original_generator.py --published
  # upstream-like sampling: 90 % style mixing (drawn per image from the seed)
  python stylegan_and_segmentation/run_original_generator.py --compat upstream
'''

UPSTREAM_STYLE_MIXING_PROB = 0.9


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
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    layout = Layout(args.root)
    if args.published:
        moved = import_published(layout)
        print(f'imported {moved} published images into {layout.synthesized_dir}')
        return
    # Every option and the output folder are checked before the weights are fetched or loaded.
    if not 1 <= args.num <= MAX_IMAGES:
        raise PipelineError(f'--num must be in [1, {MAX_IMAGES}] (image names have six digits), got {args.num}')
    check_float('--trunc-psi', args.trunc_psi)
    if args.trunc_layers < 0:
        raise PipelineError(f'--trunc-layers must be 0 or more, got {args.trunc_layers}')
    mixing = args.style_mixing_prob
    if mixing is None:
        mixing = UPSTREAM_STYLE_MIXING_PROB if args.compat == 'upstream' else 0.0
    check_float('--style-mixing-prob', mixing, 0.0, 1.0)
    check_outputs(layout)
    existing_images(layout.synthesized_dir)

    device = resolve_device(args.device)
    disable_tf32()
    weights = fetch('genforce_stylegan256', layout, args.weights)
    generator = load_generator(weights, key=args.generator_key, device=device)
    if args.trunc_layers > generator.num_layers:
        raise PipelineError(f'--trunc-layers {args.trunc_layers} exceeds the {generator.num_layers} layers of the '
                            f'generator in {weights}')
    recipe = SamplingRecipe(seed=args.seed, weights_sha256=weights_digest(weights),
                            generator_key=args.generator_key, trunc_psi=args.trunc_psi,
                            trunc_layers=args.trunc_layers, style_mixing_prob=mixing,
                            z_dim=generator.z_space_dim, num_layers=generator.num_layers)
    written = sample_images(generator, layout, recipe, args.num, args.batch_size, progress=not args.no_progress,
                            weights_file=weights.name)
    print(f'wrote {written} images ({args.num - written} already there) into {layout.synthesized_dir}; '
          f'z record: {layout.synthesized_z_csv}')


if __name__ == '__main__':
    run(main)
