"""Stage 4: compute the seven property scores of the parsed faces, normalise them, save raw scores and statistics.

Replaces the upstream's compute_property_scores.py (algorithm 1) and compute_property_scores_v2.py (algorithm 2).
Scoring is numpy on the CPU: --batch-size is the number of images per worker task, --device and --seed are
accepted for uniformity (nothing here is random), and --compat upstream changes nothing (upstream crashes or
writes NaN/inf where this stage uses the guard values, which is not reproducible).
"""
from __future__ import annotations

from ohlora.cli import add_common_options, make_parser, positive_int, run
from ohlora.layout import Layout
from segmentation.property_scores import compute_property_scores, default_workers

EXAMPLES = """\
  # algorithm 2 (used by v2/v3): segmentation/property_score_results/all_scores_v2{,_raw}.csv + all_scores_v2_stats.json
  python stylegan_and_segmentation/compute_property_scores.py
  # algorithm 1 (used by v1; also reads the filtered original images): all_scores{,_raw}.csv + all_scores_stats.json
  python stylegan_and_segmentation/compute_property_scores.py --algorithm 1 --workers 4
  # score new images into the space of an earlier run (its saved mean/std)
  python stylegan_and_segmentation/compute_property_scores.py --root new_run --stats all_scores_v2_stats.json
  # recompute everything instead of reusing the raw scores of unchanged images
  python stylegan_and_segmentation/compute_property_scores.py --force
"""


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    parser.add_argument('--algorithm', type=int, choices=(1, 2), default=2,
                        help='1: upstream compute_property_scores.py (v1); 2: compute_property_scores_v2.py '
                             '(v2/v3; default)')
    parser.add_argument('--stats', default=None, metavar='FILE',
                        help='normalise with the mean/std saved in this stats JSON (of a run of the same '
                             '--algorithm) instead of this run\'s own (needed for fewer than 2 images or a '
                             'constant score column)')
    parser.add_argument('--workers', type=positive_int, default=default_workers(),
                        help='processes scoring images in parallel (default: %(default)s, the CPU count up to 8)')
    parser.add_argument('--force', action='store_true',
                        help='score every image again instead of reusing the raw scores of unchanged images')
    add_common_options(parser, batch_size=64, batch_size_help='images per worker task')
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    layout = Layout(args.root)
    summary = compute_property_scores(layout, args.algorithm, stats_file=args.stats, workers=args.workers,
                                      chunk_size=args.batch_size, force=args.force, progress=not args.no_progress)
    for line in summary.lines():
        print(line)


if __name__ == '__main__':
    run(main)
