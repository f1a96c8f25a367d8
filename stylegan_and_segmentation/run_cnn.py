"""Stage 2: score every stage-1 image for gender and quality with the 5-fold CNN ensembles, and keep the good women.

Images with applicable hand labels (the published set, or --labels) use their labels; every other image gets
the mean of the five fold models of each property. Images with gender >= 0.7 and quality >= 0.9 are linked
into stylegan/synthesize_results_filtered/. The published CNN weights are used (downloaded when absent)
unless --retrain trains new ones from the labels.
"""
from __future__ import annotations

import os

from cnn.ensemble import load_ensemble, published_weights
from cnn.filtering import (describe_removed, merge_scores, score_summary, select, sync_filtered,
                           write_table_if_changed)
from cnn.images import IMAGE_SIZE
from cnn.labels import applicable_labels
from cnn.models import MODEL_CLASSES
from cnn.properties import FOLDS, GENDER, PROPERTIES, QUALITY
from cnn.scoring import score_images, scoring_settings
from cnn.training import TrainingConfig, TrainingSamples, train_all
from ohlora.atomic import check_replaceable, check_writable
from ohlora.cli import add_common_options, check_float, make_parser, positive_int, run
from ohlora.devices import disable_tf32, resolve_device
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from stylegan.sampling import existing_images, image_source

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
    return parser


def check_options(args) -> None:
    for name in ('gender_threshold', 'quality_threshold'):  # scores are in [0, 1]: outside, keep all or none
        check_float(f'--{name.replace("_", "-")}', getattr(args, name), 0.0, 1.0)
    if args.retrain and args.weights is not None:
        raise PipelineError('--weights and --retrain exclude each other: --retrain writes cnn/models/ itself')
    if args.workers < 0:
        raise PipelineError(f'--workers must be 0 or more, got {args.workers}')


def output_folders(layout: Layout, retrain: bool) -> list:
    folders = [layout.cnn_record('scoring').parent, layout.cnn_inference_csv('gender').parent,
               layout.cnn_merged_csv.parent, layout.filtered_dir, layout.cnn_models_dir]
    if retrain:
        folders += [layout.cnn_staged_model('gender', 0).parent, layout.cnn_log_dir]
    return folders


def retrain(args, layout: Layout, labels, device, compat: bool) -> None:
    if labels is None:
        raise PipelineError('--retrain needs labels: import the published images with run_original_generator.py '
                            '--published (the shipped hand labels belong to them) or pass --labels CSV')
    config = TrainingConfig(max_epochs=args.max_epochs, patience=args.patience, max_attempts=args.max_attempts,
                            train_batch_size=args.train_batch_size, eval_batch_size=args.batch_size,
                            schedule='upstream' if compat else 'restarts', seed=args.seed, folds=FOLDS)
    jobs = [(spec, TrainingSamples(labels.img_nos, [layout.synthesized_image(int(n)) for n in labels.img_nos],
                                   labels.of(prop), IMAGE_SIZE), MODEL_CLASSES[prop])
            for prop, spec in PROPERTIES.items()]
    outcomes = train_all(jobs, layout, config, device, args.workers, progress=not args.no_progress)
    for prop, outcome in outcomes.items():
        if outcome.up_to_date:
            print(f'{prop}: cnn/models already holds the models of this --retrain (same labels and settings)')
        else:
            print(f'{prop}: {FOLDS} fold models trained ({len(outcome.resumed)} resumed) and installed in '
                  f'{layout.cnn_models_dir}; logs in {layout.cnn_log_dir}')
        for img_no, reason in sorted(outcome.unreadable.items()):
            print(f'warning: labelled image {img_no:06d} left out of training: {reason}')


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_options(args)
    compat = args.compat == 'upstream'
    layout = Layout(args.root)
    check_writable(*output_folders(layout, args.retrain))
    check_replaceable(layout.cnn_record('scoring'), layout.cnn_merged_csv,
                      *[path for prop in PROPERTIES for path in (layout.cnn_inference_csv(prop),
                                                                  layout.cnn_partial_scores(prop))])
    available = existing_images(layout.synthesized_dir)
    if not available:
        source = image_source(layout)
        if source is None:
            raise PipelineError(f'{layout.synthesized_dir} holds no images; run run_original_generator.py first')
        raise PipelineError(f'{layout.synthesized_dir} holds no images, although {layout.synthesized_meta} records '
                            f'{source} images there: they were deleted; rerun run_original_generator.py')
    existing_images(layout.filtered_dir)  # a filtered folder with foreign files fails now, not after scoring
    labels = applicable_labels(layout, args.labels, available)
    device = resolve_device(args.device)
    disable_tf32()
    if args.retrain:
        retrain(args, layout, labels, device, compat)

    weights = {prop: published_weights(prop, layout, args.weights) for prop in PROPERTIES}
    ensembles = {prop: load_ensemble(prop, paths, device) for prop, paths in weights.items()}
    labelled = set() if labels is None else set(int(n) for n in labels.img_nos)
    to_score = sorted(available - labelled)
    settings = scoring_settings(weights, compat, args.seed, args.batch_size)
    print(f'{len(labelled)} images use labels ({labels.origin if labels else "none apply"}); '
          f'{len(to_score)} are scored by the ensembles ({"dropout on, --compat upstream" if compat else "eval mode"})')
    result = score_images(layout, ensembles, to_score, settings, device=device, batch_size=args.batch_size,
                          workers=args.workers, dropout_seed=args.seed if compat else None,
                          progress=not args.no_progress)
    if result.changed:
        print(f'{result.changed} images changed since they were scored (other bytes under the same name); '
              'scored again')
    for img_no, reason in result.skipped:
        print(f'warning: image {img_no:06d} skipped: {reason}')

    merged = merge_scores(layout, sorted(available), labels, result.frames)
    write_table_if_changed(layout.cnn_merged_csv, merged)
    keep = select(merged, args.gender_threshold, args.quality_threshold)
    outcome = sync_filtered(layout, keep, progress=not args.no_progress)
    print(score_summary(merged, args.gender_threshold, args.quality_threshold))
    if outcome.removed:
        print(f'removed {len(outcome.removed)} filtered images of an earlier run that these thresholds do not keep: '
              f'{describe_removed(outcome.removed)}')
    print(f'kept {outcome.kept} images in {layout.filtered_dir} ({outcome.linked} linked, {outcome.copied} copied, '
          f'{outcome.unchanged} already there); scores in {layout.cnn_merged_csv}'
          + (f'; {len(result.skipped)} unreadable images skipped' if result.skipped else ''))


if __name__ == '__main__':
    run(main)
