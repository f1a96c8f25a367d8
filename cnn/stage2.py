"""Stage 2 from end to end (``run_cnn.py``): check, optionally retrain, score, merge, filter; return the report.

Every check a user can fail (options, output folders, the stage-1 images, the labels) comes before anything is
fetched, trained or written. Progress notes go to the log; what the run did comes back as a :class:`Stage2Report`
whose :meth:`~Stage2Report.lines` the script prints.

Only the ensemble scoring is split over several processes (torchrun ranks or ``--shard i/n`` jobs); the merge
(rank 0 under torchrun, else :func:`merge_stage2_shards`) writes the score CSVs and the scoring record, then merges,
filters and links as one process does.
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
from cnn.scoring import (ScoringResult, finish, merge_shard_rows, require_some_scores, score_images, score_shard,
                         scoring_settings)
from cnn.training import TrainingConfig, TrainingOutcome, TrainingSamples, train_all
from ohlora.atomic import check_replaceable, check_writable
from ohlora.cli import check_float
from ohlora.constants import NUM_FOLDS
from ohlora.devices import disable_tf32, resolve_device
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.records import load_record, sha256_bytes
from ohlora.sharding import ShardRecords, Sharding, check_shard_option, merge_command, start
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
    shard: str | None = None                 # 'i/n': this job's share of the scoring (then merge the shards)
    amp: bool = False                        # bfloat16 autocast while scoring (recorded in the scoring record)


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

    shard: str | None = None     # a --shard job: its share ('i/n'); merging, filtering and linking are to come
    quiet: bool = False          # a torchrun rank other than 0 prints nothing

    def lines(self) -> list[str]:
        """What the script prints (stdout): retraining, scoring, filtering, in the order they happened."""
        layout, result = self.layout, self.scoring
        if self.quiet:
            return []
        if self.shard is not None:
            return [f'shard {self.shard}: scored {result.scored_now} images (reused {result.reused} scores'
                    + (f', {len(result.skipped)} unreadable' if result.skipped else '')
                    + f'); once every shard has finished, merge them: {stage2_merge_command(layout)}']
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
    check_shard_option(request.shard)
    if request.retrain and request.shard is not None:
        raise PipelineError('--retrain trains in one process; retrain first, then score with --shard')


def stage2_merge_command(layout: Layout) -> str:
    return merge_command('2', layout.root)


def shard_records(layout: Layout) -> ShardRecords:
    return ShardRecords(layout.shard_records('2'), stage2_merge_command(layout))


def images_digest(img_nos: list[int]) -> str:
    """Which images are scored (every shard must split the same list)."""
    return sha256_bytes(','.join(map(str, img_nos)).encode('ascii'))


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
    sharding = start(resolve_device(request.device), request.shard)
    device = sharding.ctx.device
    if sharding.active and request.retrain:
        raise PipelineError('--retrain trains in one process; retrain first, then score under torchrun')
    records = shard_records(layout)
    if not sharding.active:
        records.refuse_unmerged()  # before --retrain replaces the models the shards scored with
    disable_tf32()
    trained = retrain(request, layout, labels, device) if request.retrain else {}

    weights = {prop: published_weights(prop, layout, request.weights) for prop in PROPERTIES}
    ensembles = {prop: load_ensemble(prop, paths, device) for prop, paths in weights.items()}
    labelled = set() if labels is None else set(int(n) for n in labels.img_nos)
    to_score = sorted(available - labelled)
    settings = scoring_settings(weights, request.compat, request.seed, request.batch_size, request.amp)
    options = dict(device=device, batch_size=request.batch_size, workers=request.workers,
                   dropout_seed=request.seed if request.compat else None, progress=request.progress)
    if sharding.active:
        return _score_share(request, layout, sharding, records, ensembles, labels, labelled, to_score, settings,
                            options)
    result = score_images(layout, ensembles, to_score, settings, **options)
    for img_no, reason in result.skipped:
        logger.warning('image %06d skipped: %s', img_no, reason)
    return _merge_and_filter(request, layout, available, labels, len(labelled), to_score, result, trained)


def _merge_and_filter(request: Stage2Request, layout: Layout, available: set[int], labels: Labels | None,
                      labelled: int, to_score: list[int], result: ScoringResult,
                      trained: dict[str, TrainingOutcome] | None = None) -> Stage2Report:
    """The merged CSV and the filtered folder from the scores (one process, or the merge of a split run)."""
    merged = merge_scores(layout, sorted(available), labels, result.frames)
    write_table_if_changed(layout.cnn_merged_csv, merged)
    keep = select(merged, request.gender_threshold, request.quality_threshold)
    filtered = sync_filtered(layout, keep, progress=request.progress)
    return Stage2Report(layout, request, labels, labelled, len(to_score), result,
                        score_summary(merged, request.gender_threshold, request.quality_threshold), filtered,
                        trained or {})


def _shard_key(request: Stage2Request, settings: dict, to_score: list[int]) -> dict:
    """What every shard must share: the scoring settings, the images and batches split, and what the merge does
    with the scores (labels, thresholds)."""
    return {'settings': settings, 'batch_size': request.batch_size, 'images_sha256': images_digest(to_score),
            'labels': None if request.labels is None else str(request.labels),
            'gender_threshold': request.gender_threshold, 'quality_threshold': request.quality_threshold}


def _score_share(request: Stage2Request, layout: Layout, sharding: Sharding, records: ShardRecords, ensembles,
                 labels: Labels | None, labelled: set[int], to_score: list[int], settings: dict,
                 options: dict) -> Stage2Report:
    result = score_shard(layout, ensembles, to_score, settings, shard=sharding.shard, records=records,
                         key=_shard_key(request, settings, to_score), **options)
    if not sharding.torchrun:
        return Stage2Report(layout, request, labels, len(labelled), len(to_score), result, '', FilterResult(0, 0, 0, 0, []),
                            shard=str(sharding.shard))
    report = sharding.finish(lambda: merge_stage2_shards(layout.root, progress=request.progress))
    return report if report is not None else Stage2Report(layout, request, labels, len(labelled), len(to_score),
                                                          result, '', FilterResult(0, 0, 0, 0, []), quiet=True)


def merge_stage2_shards(root: str | Path | None, progress: bool = True) -> Stage2Report:
    """``merge_shards.py --stage 2``: the score CSVs and the scoring record from the rows of every shard, then the
    merged CSV and the filtered folder, exactly as one process writes them."""
    layout = Layout(root)
    records = shard_records(layout)
    shards = records.collect()
    key = shards[0]['key']
    request = Stage2Request(root=root, labels=key['labels'], gender_threshold=key['gender_threshold'],
                            quality_threshold=key['quality_threshold'], batch_size=key['batch_size'],
                            compat=key['settings'].get('mode', '').startswith('dropout'), progress=progress)
    check_writable(*output_folders(layout, False))
    available = stage1_images(layout)
    labels = applicable_labels(layout, request.labels, available)
    labelled = set() if labels is None else set(int(n) for n in labels.img_nos)
    to_score = sorted(available - labelled)
    if images_digest(to_score) != key['images_sha256']:
        raise PipelineError(f'the images to score in {layout.synthesized_dir} (or the labels) changed since the shards '
                            'ran; rerun every shard, then merge')
    frames, skipped = merge_shard_rows(records, shards, list(PROPERTIES), to_score)
    require_some_scores(frames, skipped)
    earlier = load_record(layout.cnn_scoring_record)
    finals = [layout.cnn_inference_csv(p) for p in PROPERTIES if layout.cnn_inference_csv(p).exists()]
    replaced = finals[0].parent if finals and (earlier is None or earlier.get('settings') != key['settings']) else None
    finish(layout, frames, key['settings'])
    for img_no, reason in skipped:
        logger.warning('image %06d skipped: %s', img_no, reason)
    result = ScoringResult(frames, skipped, sum(r.get('scored', 0) for r in shards),
                           sum(r.get('changed', 0) for r in shards), sum(r.get('reused', 0) for r in shards), replaced)
    report = _merge_and_filter(request, layout, available, labels, len(labelled), to_score, result)
    records.remove()
    return report
