"""Stage 6: generate Oh-LoRA images with chosen attribute values from the fine-tuned StyleGAN (v3, v1, v2) or by
moving w of a base StyleGAN along fitted attribute directions (--model directions, find_attribute_directions.py).

By default this reproduces upstream's final test: the v3 generator (stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth,
downloaded from Hugging Face if absent), z from stylegan_modified/test_z_vector_0005.csv, label eyes 1.8, mouth 1.6,
pose -1.2 (the other four 0), 20 images: 000000.jpg is the CSV z, 000001..000019 add 0.3 * N(0, I) drawn per image
from --seed. Attribute values are z-scores of the property scores (stage 4). v3 learned only eyes, mouth and pose.
--sweep renders each z for several values of one attribute and writes a labelled grid. A rerun skips finished
images; a folder made with other settings is refused. Upstream's only differences here (unseeded noise, train
mode) have no compat mode, so --compat upstream changes nothing. Attribute values and --variation beyond +-1000
are refused (float32 maths overflows long before the largest floats).
"""
from __future__ import annotations

from ohlora.cli import add_common_options, add_scale_options, make_parser, positive_int, request_from, run
from ohlora.constants import PROPERTY_NAMES
from ohlora.weights import SOURCES
from stylegan_modified.labels import UPSTREAM_LABEL, option_name
from stylegan_modified.stage6 import (DEFAULT_NUM, DEFAULT_SWEEP_NUM, DEFAULT_SWEEP_VALUES, MODELS,
                                      Stage6Request, run_stage6)

EXAMPLES = '''
  # upstream's final test: 20 images into stylegan_modified/final_inference_test_v3/
  python stylegan_and_segmentation/run_fine_tuned_generator.py
  # eyes wide open, mouth closed, head turned the other way; 8 images, another seed
  python stylegan_and_segmentation/run_fine_tuned_generator.py --eyes 2.5 --mouth -1.0 --pose 2.0 --num 8 --seed 3
  # what does the mouth value do? 4 z's x 5 values, plus the grid sweep_mouth/sweep_mouth.png
  python stylegan_and_segmentation/run_fine_tuned_generator.py --sweep mouth --values -1,0,1,2,3
  # the v1 generator (all seven attributes were trained), a weights file you already have, own folder
  python stylegan_and_segmentation/run_fine_tuned_generator.py --model v1 --weights my/v1.pth --outdir out/v1
  # the attribute directions (absolute targets: the predicted scores of the edited image equal these values)
  python stylegan_and_segmentation/run_fine_tuned_generator.py --model directions --eyes 1.0 --mouth 2.0 --pose 0.5
  # another z: a one-row CSV with the header 0,1,...,511
  python stylegan_and_segmentation/run_fine_tuned_generator.py --z-csv stylegan_modified/test_z_vector_0007.csv
  # 1,000 images on 2 GPUs (rank 0 writes the records), or as job 0 of 2 cluster jobs and then the merge
  torchrun --standalone --nproc_per_node 2 -- stylegan_and_segmentation/run_fine_tuned_generator.py --num 1000
  python stylegan_and_segmentation/run_fine_tuned_generator.py --num 1000 --shard 0/2
  python stylegan_and_segmentation/merge_shards.py --stage 6 --model v3
'''


def attribute_name(text: str) -> str:
    return text.replace('-', '_')  # --sweep hair-color or hair_color


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    parser.add_argument('--model', choices=MODELS, default='v3',
                        help='fine-tuned generator v1, v2 or v3 (default: v3, the one upstream adopted), or '
                             'directions (a base generator moved along fitted attribute directions)')
    parser.add_argument('--weights', default=None, metavar='PATH',
                        help='generator state_dict (default: stylegan_modified/<published file>, downloaded from '
                             f'{SOURCES["v3_generator"].hf_repo} if absent; v2: the file v2 training wrote); with '
                             '--model directions the base generator the directions were fitted on')
    parser.add_argument('--directions', default=None, metavar='FILE',
                        help='--model directions: the directions file (default: '
                             'stylegan_modified/attribute_directions.pt, made by find_attribute_directions.py)')
    attributes = parser.add_argument_group('attribute values (z-scores; defaults: the upstream final test)')
    for name in PROPERTY_NAMES:
        note = '' if name in ('eyes', 'mouth', 'pose') else '; not learned by v3'
        attributes.add_argument(option_name(name), dest=name, type=float, default=UPSTREAM_LABEL[name],
                                metavar='Z', help=f'default: {UPSTREAM_LABEL[name]:g}{note}')
    parser.add_argument('--num', type=positive_int, default=None,
                        help=f'images (z vectors) 0..NUM-1 (default: {DEFAULT_NUM}; {DEFAULT_SWEEP_NUM} with --sweep)')
    parser.add_argument('--variation', type=float, default=0.3,
                        help='std of the noise added to the CSV z for images 1.. (default: 0.3, as upstream)')
    parser.add_argument('--z-csv', default=None, metavar='CSV',
                        help='one-row CSV with header 0..n-1 holding the base z (default: '
                             'stylegan_modified/test_z_vector_0005.csv); n must be the generator\'s z width')
    parser.add_argument('--outdir', default=None, metavar='DIR',
                        help='output folder (default: <root>/stylegan_modified/final_inference_test_<model>/)')
    parser.add_argument('--sweep', type=attribute_name, choices=PROPERTY_NAMES, default=None, metavar='ATTR',
                        help=f'vary one attribute ({", ".join(PROPERTY_NAMES)}) over --values; writes '
                             'sweep_ATTR/ with the images and the grid sweep_ATTR.png (rows = z, columns = values)')
    parser.add_argument('--values', default=None, metavar='A,B,...',
                        help=f'comma-separated values for --sweep (default: {DEFAULT_SWEEP_VALUES})')
    add_common_options(parser, batch_size=4)
    add_scale_options(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    report = run_stage6(request_from(Stage6Request, args,
                                     attributes={name: getattr(args, name) for name in PROPERTY_NAMES}))
    for line in report.lines():
        print(line)


if __name__ == '__main__':
    run(main)
