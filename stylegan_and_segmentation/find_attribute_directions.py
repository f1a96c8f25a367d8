"""Find one direction per attribute in StyleGAN's w space ("VectorFind", done with absolute targets).

Samples --num images from the base generator (each z from --seed and its index), keeps each image's w and its 7
property-CNN scores (in resumable chunks under stylegan_modified/attribute_direction_samples/; images only with
--save-images), fits a direction per attribute (--method ridge: least squares, calibrated; svm: upstream's
LinearSVC on the top/bottom --fraction) and writes the directions file (default
stylegan_modified/attribute_directions.pt) with a fit-quality report beside it. Stage 6 and the evaluation then
move w so that the predicted score of each attribute equals the requested value. A rerun reuses the samples; a
samples folder made with another generator, property CNN or seed is refused.
"""
from __future__ import annotations

from ohlora.cli import add_common_options, add_scale_options, make_parser, positive_int, run
from ohlora.constants import PROPERTY_NAMES
from ohlora.errors import PipelineError
from stylegan_modified.direction_finding import (DEFAULT_CHUNK_SIZE, DEFAULT_NUM, FindRequest,
                                                 find_attribute_directions)
from stylegan_modified.direction_fitting import DEFAULT_ATTRIBUTES, FitOptions

EXAMPLES = '''
  # 80,000 samples from the GenForce StyleGAN, ridge directions for eyes, mouth and pose (a GPU helps)
  python stylegan_and_segmentation/find_attribute_directions.py
  # the same, each direction projected off the other six attributes' (less leakage), own file
  python stylegan_and_segmentation/find_attribute_directions.py --orthogonal --output runs/dirs_orth.pt
  # upstream's recipe: v1 generator, LinearSVC on the top/bottom 20 %, 8 hair/background groups
  python stylegan_and_segmentation/find_attribute_directions.py --compat upstream
  # a quick look on a CPU: 2,000 samples, edits on the coarse layers 0-7 only, files you already have
  python stylegan_and_segmentation/find_attribute_directions.py --num 2000 --layers 0-7 \\
      --weights stylegan_celeba_partial256.pth --property-cnn stylegan_gen_fine_tuned_v2_cnn.pth
  # the hair colour as well, and keep the sampled images (JPEGs beside the samples)
  python stylegan_and_segmentation/find_attribute_directions.py --attributes eyes,mouth,pose,hair_color --save-images
  # 300,000 samples on 4 GPUs: every rank samples its chunks, rank 0 merges and fits
  torchrun --standalone --nproc_per_node 4 -- stylegan_and_segmentation/find_attribute_directions.py --num 300000
  # or as 4 cluster jobs that only sample (job 2 of 4 here), then the merge, then the fit (reuses every sample)
  python stylegan_and_segmentation/find_attribute_directions.py --num 300000 --shard 2/4
  python stylegan_and_segmentation/merge_shards.py --stage directions
  python stylegan_and_segmentation/find_attribute_directions.py --num 300000
'''


def attribute_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip().replace('-', '_') for part in text.split(',') if part.strip())


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    parser.add_argument('--generator', choices=['original', 'v1'], default=None,
                        help='base generator: the GenForce StyleGAN (default) or the Oh-LoRA v1 generator '
                             '(mapped with label 0; the default with --compat upstream)')
    parser.add_argument('--weights', default=None, metavar='PATH',
                        help='base generator file (default: stylegan/stylegan_model.pth or '
                             'stylegan_modified/stylegan_gen_fine_tuned_v1.pth, downloaded if absent)')
    parser.add_argument('--property-cnn', default=None, metavar='PATH',
                        help='property-score CNN file (default: stylegan_modified/stylegan_gen_fine_tuned_v2_cnn.pth, '
                             'downloaded if absent)')
    parser.add_argument('--num', type=positive_int, default=DEFAULT_NUM,
                        help=f'samples (images) 0..NUM-1 (default: {DEFAULT_NUM})')
    parser.add_argument('--method', choices=['ridge', 'svm'], default=None,
                        help='ridge: least squares of each score on w (default); svm: LinearSVC on the top/bottom '
                             '--fraction, as upstream (the default with --compat upstream)')
    parser.add_argument('--fraction', type=float, default=None,
                        help='svm: share of top and of bottom scores the SVM separates (default: 0.2)')
    parser.add_argument('--groups', action='store_true', default=None,
                        help='svm: one model per group of the medians of hair_color, hair_length, background_mean '
                             '(8 groups, as upstream; on with --compat upstream)')
    parser.add_argument('--orthogonal', action='store_true',
                        help='fit the other attributes too and hold them: each direction is projected off the '
                             'others (InterFaceGAN conditional manipulation)')
    parser.add_argument('--attributes', type=attribute_list, default=DEFAULT_ATTRIBUTES, metavar='A,B,...',
                        help=f'attributes to control (default: {",".join(DEFAULT_ATTRIBUTES)}; any of '
                             f'{",".join(PROPERTY_NAMES)})')
    parser.add_argument('--layers', default='all', metavar='RANGE',
                        help="synthesis layers an edit applies to: 'all' (default), K, or A-B such as 0-7")
    parser.add_argument('--save-images', action='store_true', help='also keep the sampled images (JPEG)')
    parser.add_argument('--output', default=None, metavar='FILE',
                        help='directions file (default: stylegan_modified/attribute_directions.pt under --root)')
    parser.add_argument('--samples-dir', default=None, metavar='DIR',
                        help='sample chunks (default: stylegan_modified/attribute_direction_samples/ under --root)')
    parser.add_argument('--chunk-size', type=positive_int, default=DEFAULT_CHUNK_SIZE,
                        help=f'samples per chunk file; an interruption loses at most one (default: {DEFAULT_CHUNK_SIZE})')
    parser.add_argument('--holdout', type=float, default=0.1,
                        help='share of samples kept out of the fit to measure its quality (default: 0.1)')
    parser.add_argument('--alpha', type=float, default=1.0,
                        help='L2 penalty of the least-squares fits: ridge, and the svm calibration (default: 1.0)')
    parser.add_argument('--svm-c', type=float, default=1.0, help="svm: LinearSVC's C (default: 1.0)")
    add_common_options(parser, batch_size=32, batch_size_help='images per generator + CNN pass')
    add_scale_options(parser, unit='sample chunks')
    return parser


def request_of(args) -> FindRequest:
    upstream = args.compat == 'upstream'
    method = args.method or ('svm' if upstream else 'ridge')
    if method != 'svm':
        given = [name for name, value in (('--fraction', args.fraction), ('--groups', args.groups)) if value]
        if given:
            raise PipelineError(f'{given[0]} applies to --method svm only')
    groups = bool(args.groups) if args.groups is not None else (upstream and method == 'svm')
    fit = FitOptions(method=method, attributes=args.attributes, orthogonal=args.orthogonal,
                     fraction=0.2 if args.fraction is None else args.fraction, groups=groups, alpha=args.alpha,
                     svm_c=args.svm_c, holdout=args.holdout, seed=args.seed)
    return FindRequest(fit=fit, generator=args.generator or ('v1' if upstream else 'original'), weights=args.weights,
                       property_cnn=args.property_cnn, num=args.num, layers=args.layers,
                       save_images=args.save_images, output=args.output, samples_dir=args.samples_dir,
                       chunk_size=args.chunk_size, seed=args.seed, batch_size=args.batch_size, device=args.device,
                       root=args.root, progress=not args.no_progress, shard=args.shard, amp=args.amp)


def main(argv=None):
    args = build_parser().parse_args(argv)
    result = find_attribute_directions(request_of(args))
    for line in result.lines():
        print(line)


if __name__ == '__main__':
    run(main)
