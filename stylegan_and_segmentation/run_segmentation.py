"""Stage 3: MTCNN face detection and FaceXFormer face parsing of the filtered images.

Writes parsing_NNNNNN.png (8-bit class map 0-10, 224x224, in the face-crop frame), parsing_visualization_NNNNNN.png
and face_NNNNNN.png (the 224x224 crop the parser saw) into segmentation/segmentation_results/, plus skipped.csv
(images with no face, too small or unreadable) and segmentation_meta.json (settings, and per image its input file and
the SHA-256 of its bytes). A rerun skips images whose results were made from the same bytes with the same weights.
Nothing here is random (--seed is only recorded), and the upstream fixes of this stage change no output, so
--compat upstream changes nothing.
"""
from __future__ import annotations

from ohlora.cli import add_common_options, add_scale_options, make_parser, request_from, run
from segmentation.stage3 import Stage3Request, run_stage3

EXAMPLES = '''
  # parse stylegan/synthesize_results_filtered/ (downloads FaceXFormer ckpts/model.pt, 1.1 GB, if needed)
  python stylegan_and_segmentation/run_segmentation.py
  # on a GPU with bigger batches, with a checkpoint you already have
  python stylegan_and_segmentation/run_segmentation.py --device cuda --batch-size 64 --weights model.pt
  # another folder of NNNNNN.jpg images, results under another root
  python stylegan_and_segmentation/run_segmentation.py --images my_faces/ --root runs/demo
  # 8 GPUs of one machine (rank 0 writes the record and skipped.csv), or job 1 of 8 and then the merge
  torchrun --standalone --nproc_per_node 8 -- stylegan_and_segmentation/run_segmentation.py --batch-size 64
  python stylegan_and_segmentation/run_segmentation.py --shard 1/8
  python stylegan_and_segmentation/merge_shards.py --stage 3
'''


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    parser.add_argument('--weights', default=None, metavar='PATH',
                        help='FaceXFormer checkpoint (default: segmentation/models/segmentation_model.pt, '
                             'downloaded from kartiknarayan/facexformer if absent)')
    parser.add_argument('--images', default=None, metavar='DIR',
                        help='folder of NNNNNN.jpg images (default: stylegan/synthesize_results_filtered)')
    add_common_options(parser, batch_size=16)
    add_scale_options(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    report = run_stage3(request_from(Stage3Request, args))
    for line in report.lines():
        print(line)


if __name__ == '__main__':
    run(main)
