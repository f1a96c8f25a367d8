"""Stage 3: MTCNN face detection and FaceXFormer face parsing of the filtered images.

Writes parsing_NNNNNN.png (8-bit class map 0-10, 224x224, in the face-crop frame), parsing_visualization_NNNNNN.png
and face_NNNNNN.png (the 224x224 crop the parser saw) into segmentation/segmentation_results/, plus skipped.csv
(images with no face, too small or unreadable) and segmentation_meta.json (settings, and per image its input file and
the SHA-256 of its bytes). A rerun skips images whose results were made from the same bytes with the same weights.
Nothing here is random (--seed is only recorded), and the upstream fixes of this stage change no output, so
--compat upstream changes nothing.
"""
from __future__ import annotations

from pathlib import Path

from ohlora.cli import add_common_options, make_parser, run
from ohlora.devices import disable_tf32, resolve_device
from ohlora.layout import Layout
from ohlora.records import weights_digest
from ohlora.weights import fetch
from segmentation.face_detection import FaceDetector
from segmentation.facexformer import load_facexformer
from segmentation.parsing import (StageRecord, check_outputs, list_input_images, plan_work, run_info, run_stage,
                                  stage2_empty_reason, stage_settings)

EXAMPLES = '''
  # parse stylegan/synthesize_results_filtered/ (downloads FaceXFormer ckpts/model.pt, 1.1 GB, if needed)
  python stylegan_and_segmentation/run_segmentation.py
  # on a GPU with bigger batches, with a checkpoint you already have
  python stylegan_and_segmentation/run_segmentation.py --device cuda --batch-size 64 --weights model.pt
  # another folder of NNNNNN.jpg images, results under another root
  python stylegan_and_segmentation/run_segmentation.py --images my_faces/ --root runs/demo
'''


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    parser.add_argument('--weights', default=None, metavar='PATH',
                        help='FaceXFormer checkpoint (default: segmentation/models/segmentation_model.pt, '
                             'downloaded from kartiknarayan/facexformer if absent)')
    parser.add_argument('--images', default=None, metavar='DIR',
                        help='folder of NNNNNN.jpg images (default: stylegan/synthesize_results_filtered)')
    add_common_options(parser, batch_size=16)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    layout = Layout(args.root)
    images_dir = Path(args.images) if args.images else layout.filtered_dir
    # checked before any weights are fetched or loaded
    inputs = list_input_images(images_dir, None if args.images else stage2_empty_reason(layout))
    if inputs.ignored:
        print(f'ignoring {len(inputs.ignored)} files in {images_dir} that are not NNNNNN.jpg images '
              f'(e.g. {inputs.ignored[0]})')
    check_outputs(layout)

    weights = fetch('facexformer', layout, args.weights)
    settings = stage_settings(weights_digest(weights))
    work = plan_work(layout, inputs, settings)
    done, pending = work.finished, work.pending
    earlier_skips = f', {len(work.settled_skips)} skipped before' if work.settled_skips else ''
    if work.changed:
        print(f'{work.changed} images changed since they were parsed (other bytes under the same number); '
              'parsing them again')
    if not pending:
        print(f'nothing to do: {done} images parsed in {layout.segmentation_dir}{earlier_skips}')
        return

    device = resolve_device(args.device)
    disable_tf32()
    model = load_facexformer(weights, device)
    detector = FaceDetector()
    info = run_info(layout, images_dir=images_dir, weights=weights, device=device, batch_size=args.batch_size,
                    seed=args.seed, already_done=done, ignored=inputs.ignored)
    summary = run_stage(layout, model, detector, pending, args.batch_size, device, progress=not args.no_progress,
                        present={n for n, _ in inputs.images},
                        record=StageRecord(layout, settings, work.inputs, info))
    skipped = f'; skipped {len(summary.skipped)} (see {layout.segmentation_skipped_csv})' if summary.skipped else ''
    print(f'parsed {summary.parsed} images ({done} already there{earlier_skips}){skipped}; '
          f'results in {layout.segmentation_dir}')


if __name__ == '__main__':
    run(main)
