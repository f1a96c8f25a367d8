"""Stage 2 from end to end (``run_cnn.py``): check, optionally retrain, score, merge, filter; return the report.

Every check a user can fail (options, output folders, the stage-1 images, the labels) comes before anything is
fetched, trained or written. Progress notes go to the log; what the run did comes back as a :class:`Stage2Report`
whose :meth:`~Stage2Report.lines` the script prints.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cnn.ensemble import load_ensemble, published_weights
from cnn.filtering import (FilterResult, describe_removed, merge_scores, score_summary, select, sync_filtered,
                           write_table_if_changed)
from cnn.images import IMAGE_HW
from cnn.labels import Labels, applicable_labels
from cnn.models import MODEL_CLASSES
from cnn.properties import GENDER, PROPERTIES, QUALITY
from cnn.scoring import ScoringResult, score_images, scoring_settings
from cnn.training import TrainingConfig, TrainingOutcome, TrainingSamples, train_all
from ohlora.atomic import check_replaceable, check_writable
from ohlora.cli import check_float
from ohlora.constants import NUM_FOLDS
from ohlora.devices import disable_tf32, resolve_device
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from stylegan.sampling import existing_images, image_source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage2Request:
    """The options of ``run_cnn.py`` (the four training ones only matter with ``retrain``)."""
    root: str | Path | None = None
    weights: str | Path | None = None        # folder of the ten fold files (default: the published ones)
    labels: str | Path | None = None         # labels CSV (default: the shipped hand labels, where they apply)
    gender_threshold: float = GENDER.keep_threshold
    quality_threshold: float = QUALITY.keep_threshold
    retrain: bool = False
    max_epochs: int = TrainingConfig.max_epochs
    patience: int = TrainingConfig.patience
    max_attempts: int = TrainingConfig.max_attempts
    train_batch_size: int = TrainingConfig.train_batch_size
    workers: int = 0
    batch_size: int = 32
    seed: int = 0
    device: str | None = None
    compat: bool = False                     # --compat upstream: dropout on while scoring, upstream LR schedule
    progress: bool = True


@dataclass
class Stage2Report:
    layout: Layout
    request: Stage2Request
    labels: Labels | None
    labelled: int
    to_score: int
    scoring: ScoringResult
    merged_summary: str
    filtered: FilterResult
    trained: dict[str, TrainingOutcome] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """What the script prints (stdout): retraining, scoring, filtering, in the order they happened."""
        layout, result = self.layout, self.scoring
        out = []
        for prop, outcome in self.trained.items():
            if outcome.up_to_date:
                out.append(f'{prop}: {layout.relative(layout.cnn_models_dir)} already holds the models of this '
                           '--retrain (same labels and settings)')
            else:
                out.append(f'{prop}: {NUM_FOLDS} fold models trained ({len(outcome.resumed)} resumed) and installed '
                           f'in {layout.cnn_models_dir}; logs in {layout.cnn_log_dir}')
        mode = 'dropout on, --compat upstream' if self.request.compat else 'eval mode'
        out.append(f'{self.labelled} images use labels ({self.labels.origin if self.labels else "none apply"}); '
                   f'{self.to_score} are scored by the ensembles ({mode})')
        scored = result.scored_now + len(result.skipped)
        if result.replaced is not None:
            out.append(f'earlier scores in {result.replaced} were made with other models or settings; scored again '
                       '(they are replaced now that the new scores are complete)')
        if result.reused and scored:
            out.append(f'reusing {result.reused} scores of an earlier run; scoring the other {scored} images')
        if result.changed:
            out.append(f'{result.changed} images changed since they were scored (other bytes under the same name); '
                       'scored again')
        out.append(self.merged_summary)
        if self.filtered.removed:
            out.append(f'removed {len(self.filtered.removed)} filtered images of an earlier run that these thresholds '
                       f'do not keep: {describe_removed(self.filtered.removed)}')
        out.append(f'kept {self.filtered.kept} images in {layout.filtered_dir} ({self.filtered.linked} linked, '
                   f'{self.filtered.copied} copied, {self.filtered.unchanged} already there); scores in '
                   f'{layout.cnn_merged_csv}'
                   + (f'; {len(result.skipped)} unreadable images skipped' if result.skipped else ''))
        return out


def check_request(request: Stage2Request, layout: Layout) -> None:
    """The option checks of stage 2, before anything is read or written."""
    for option, value in (('--gender-threshold', request.gender_threshold),
                          ('--quality-threshold', request.quality_threshold)):
        check_float(option, value, 0.0, 1.0)  # scores are in [0, 1]: outside, keep all or none
    if request.retrain and request.weights is not None:
        raise PipelineError(f'--weights and --retrain exclude each other: --retrain writes '
                            f'{layout.relative(layout.cnn_models_dir)} itself')
    if request.workers < 0:
        raise PipelineError(f'--workers must be 0 or more, got {request.workers}')


def output_folders(layout: Layout, retrain: bool) -> list[Path]:
    folders = [layout.cnn_scoring_record.parent, layout.cnn_inference_csv('gender').parent,
               layout.cnn_merged_csv.parent, layout.filtered_dir, layout.cnn_models_dir]
    if retrain:
        folders += [layout.cnn_staged_model('gender', 0).parent, layout.cnn_log_dir]
    return folders


def stage1_images(layout: Layout) -> set[int]:
    """The stage-1 image numbers; none is an error that says whether stage 1 ran at all."""
    available = existing_images(layout.synthesized_dir)
    if not available:
        source = image_source(layout)
        if source is None:
            raise PipelineError(f'{layout.synthesized_dir} holds no images; run run_original_generator.py first')
        raise PipelineError(f'{layout.synthesized_dir} holds no images, although {layout.synthesized_meta} records '
                            f'{source} images there: they were deleted; rerun run_original_generator.py')
    return available


def retrain(request: Stage2Request, layout: Layout, labels: Labels | None, device) -> dict[str, TrainingOutcome]:
    """Train all fold models of both properties from the labels and install them (all or nothing)."""
    if labels is None:
        raise PipelineError('--retrain needs labels: import the published images with run_original_generator.py '
                            '--published (the shipped hand labels belong to them) or pass --labels CSV')
    config = TrainingConfig(max_epochs=request.max_epochs, patience=request.patience,
                            max_attempts=request.max_attempts, train_batch_size=request.train_batch_size,
                            eval_batch_size=request.batch_size, schedule='upstream' if request.compat else 'restarts',
                            seed=request.seed, folds=NUM_FOLDS)
    jobs = [(spec, TrainingSamples(labels.img_nos, [layout.synthesized_image(int(n)) for n in labels.img_nos],
                                   labels.of(prop), IMAGE_HW), MODEL_CLASSES[prop])
            for prop, spec in PROPERTIES.items()]
    outcomes = train_all(jobs, layout, config, device, request.workers, progress=request.progress)
    for outcome in outcomes.values():
        for img_no, reason in sorted(outcome.unreadable.items()):
            logger.warning('labelled image %06d left out of training: %s', img_no, reason)
    return outcomes


def run_stage2(request: Stage2Request) -> Stage2Report:
    """Score every stage-1 image for gender and quality (labels where they apply), merge, and make the filtered
    folder hold exactly the images both thresholds keep."""
    layout = Layout(request.root)
    check_request(request, layout)
    check_writable(*output_folders(layout, request.retrain))
    check_replaceable(layout.cnn_scoring_record, layout.cnn_merged_csv,
                      *[path for prop in PROPERTIES for path in (layout.cnn_inference_csv(prop),
                                                                  layout.cnn_partial_scores(prop))])
    available = stage1_images(layout)
    existing_images(layout.filtered_dir)  # a filtered folder with foreign files fails now, not after scoring
    labels = applicable_labels(layout, request.labels, available)
    device = resolve_device(request.device)
    disable_tf32()
    trained = retrain(request, layout, labels, device) if request.retrain else {}

    weights = {prop: published_weights(prop, layout, request.weights) for prop in PROPERTIES}
    ensembles = {prop: load_ensemble(prop, paths, device) for prop, paths in weights.items()}
    labelled = set() if labels is None else set(int(n) for n in labels.img_nos)
    to_score = sorted(available - labelled)
    settings = scoring_settings(weights, request.compat, request.seed, request.batch_size)
    result = score_images(layout, ensembles, to_score, settings, device=device, batch_size=request.batch_size,
                          workers=request.workers, dropout_seed=request.seed if request.compat else None,
                          progress=request.progress)
    for img_no, reason in result.skipped:
        logger.warning('image %06d skipped: %s', img_no, reason)

    merged = merge_scores(layout, sorted(available), labels, result.frames)
    write_table_if_changed(layout.cnn_merged_csv, merged)
    keep = select(merged, request.gender_threshold, request.quality_threshold)
    filtered = sync_filtered(layout, keep, progress=request.progress)
    return Stage2Report(layout, request, labels, len(labelled), len(to_score), result,
                        score_summary(merged, request.gender_threshold, request.quality_threshold), filtered, trained)
