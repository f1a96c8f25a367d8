"""Merge the shards of a split stage run (--shard i/n jobs) into exactly the files one process writes.

Run it once every shard has finished, with the --root (and for stage 6 the --model/--outdir/--sweep, for the
directions the --samples-dir) the shards used. It writes the stage's shared records (stage 1: the meta and the z
record; stage 2: the score CSVs, the scoring record, the merged CSV and the filtered folder; stage 3: the meta and
skipped.csv; stage 6: the settings, the z record and the sweep grid; directions: the samples record) and removes
the shard records. A missing, unfinished or mismatched shard is refused in one line and nothing is written.
Under torchrun rank 0 merges by itself; this step is for independent jobs.
"""
from __future__ import annotations

from ohlora.cli import VerboseAction, make_parser, run
from ohlora.shard_merge import STAGES, MergeRequest, merge_shards

EXAMPLES = '''
  # 8 cluster jobs ran run_original_generator.py --shard 0/8 ... --shard 7/8; then:
  python stylegan_and_segmentation/merge_shards.py --stage 1
  # stage 2 scoring and stage 3 parsing of a run under another root
  python stylegan_and_segmentation/merge_shards.py --stage 2 --root runs/big
  python stylegan_and_segmentation/merge_shards.py --stage 3 --root runs/big
  # stage 6 shards of a sweep into out/v1 (the same --outdir/--sweep as the shards)
  python stylegan_and_segmentation/merge_shards.py --stage 6 --outdir out/v1 --sweep mouth
  # the directions samples; then fit with find_attribute_directions.py (same options, no --shard)
  python stylegan_and_segmentation/merge_shards.py --stage directions
'''


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    parser.add_argument('--stage', required=True, choices=STAGES, help='the stage whose shards to merge')
    parser.add_argument('--root', default=None, metavar='DIR',
                        help='folder that holds the stage folders (default: the repository root)')
    parser.add_argument('--model', default='v3', help="stage 6: the shards' --model (default: v3)")
    parser.add_argument('--outdir', default=None, metavar='DIR', help="stage 6: the shards' --outdir")
    parser.add_argument('--sweep', default=None, metavar='ATTR', help="stage 6: the shards' --sweep")
    parser.add_argument('--samples-dir', default=None, metavar='DIR', help="directions: the shards' --samples-dir")
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.add_argument('--verbose', action=VerboseAction, help='also log progress notes on stderr')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    report = merge_shards(MergeRequest(stage=args.stage, root=args.root, model=args.model, outdir=args.outdir,
                                       sweep=args.sweep.replace('-', '_') if args.sweep else None,
                                       samples_dir=args.samples_dir, progress=not args.no_progress))
    for line in report.lines():
        print(line)


if __name__ == '__main__':
    run(main)
