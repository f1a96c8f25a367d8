"""Stage 2: score every stage-1 image for gender and quality with the 5-fold CNN ensembles, and keep the good women.

Images with applicable hand labels (the published set, or --labels) use their labels; every other image gets
the mean of the five fold models of each property. Images with gender >= 0.7 and quality >= 0.9 are linked
into stylegan/synthesize_results_filtered/. The published CNN weights are used (downloaded when absent)
unless --retrain trains new ones from the labels.
"""
from __future__ import annotations

import os

from cnn.properties import GENDER, QUALITY
from cnn.stage2 import Stage2Request, run_stage2
from cnn.training import TrainingConfig
from ohlora.cli import add_common_options, add_scale_options, make_parser, positive_int, request_from, run

EXAMPLES = '''
  # score images 0..9999 with the published CNNs (downloaded into cnn/models/ if absent) and filter them
  python stylegan_and_segmentation/run_cnn.py
  # the ten .pt files are already somewhere else
  python stylegan_and_segmentation/run_cnn.py --weights ~/downloads/ohlora_cnns
  # stricter filter; files kept by an earlier run but not by this one are removed from the filtered folder
  python stylegan_and_segmentation/run_cnn.py --gender-threshold 0.9 --quality-threshold 0.95
  # your own images and labels (img_name,quality,gender with 0/1): retrain all ten fold models, then score
  python stylegan_and_segmentation/run_cnn.py --labels my_labels.csv --retrain --seed 3
  # upstream behaviour: dropout on while scoring, upstream LR schedule when retraining
  python stylegan_and_segmentation/run_cnn.py --compat upstream
  # score on 4 GPUs (rank 0 then writes the CSVs and fills the filtered folder)
  torchrun --standalone --nproc_per_node 4 -- stylegan_and_segmentation/run_cnn.py --workers 2
  # or as job 0 of 4 cluster jobs (score only), then the merge writes, filters and links
  python stylegan_and_segmentation/run_cnn.py --shard 0/4
  python stylegan_and_segmentation/merge_shards.py --stage 2
'''


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    parser.add_argument('--weights', default=None, metavar='DIR',
                        help='folder holding gender_model_{0..4}.pt and quality_model_{0..4}.pt '
                             '(default: cnn/models/, downloaded from Hugging Face if absent)')
    parser.add_argument('--labels', default=None, metavar='CSV',
                        help='labels (img_name,quality,gender; 1 = good / woman) for the images they list; '
                             'default: the shipped hand labels, only for images imported with --published')
    parser.add_argument('--gender-threshold', type=float, default=GENDER.keep_threshold, metavar='X',
                        help=f'keep images with gender score >= this (default: {GENDER.keep_threshold})')
    parser.add_argument('--quality-threshold', type=float, default=QUALITY.keep_threshold, metavar='X',
                        help=f'keep images with quality score >= this (default: {QUALITY.keep_threshold})')
    training = parser.add_argument_group('training (only with --retrain)')
    training.add_argument('--retrain', action='store_true',
                          help='train new fold models from the labels and replace cnn/models/*.pt when all succeed')
    training.add_argument('--max-epochs', type=positive_int, metavar='N', default=TrainingConfig.max_epochs,
                          help=f'epoch cap per fold attempt (default: {TrainingConfig.max_epochs})')
    training.add_argument('--patience', type=positive_int, metavar='N', default=TrainingConfig.patience,
                          help=f'stop this many epochs after the best one (default: {TrainingConfig.patience})')
    training.add_argument('--max-attempts', type=positive_int, metavar='N', default=TrainingConfig.max_attempts,
                          help='fresh-init retries of a fold whose best validation BCE misses the bound '
                               f'(default: {TrainingConfig.max_attempts})')
    training.add_argument('--train-batch-size', type=positive_int, metavar='N', default=TrainingConfig.train_batch_size,
                          help=f'training batch size (default: {TrainingConfig.train_batch_size})')
    parser.add_argument('--workers', type=int, metavar='N', default=min(4, os.cpu_count() or 1),
                        help='processes decoding JPEGs in the background; 0 decodes in the main process '
                             '(default: min(4, CPUs))')
    add_common_options(parser, batch_size=32)
    add_scale_options(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    report = run_stage2(request_from(Stage2Request, args))
    for line in report.lines():
        print(line)


if __name__ == '__main__':
    run(main)
