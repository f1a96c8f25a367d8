"""Stage 3 from end to end (``run_segmentation.py``): list the input images, plan the work against the record,
detect and parse what is pending; return the report.

The input folder and the output folder are checked before the weights are fetched or loaded; nothing is loaded
when every image is already done. Under torchrun every rank parses its share and rank 0 merges; with
``--shard i/n`` each job parses its share and :func:`merge_stage3_shards` (``merge_shards.py --stage 3``) writes
the record and ``skipped.csv``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ohlora.devices import disable_tf32, resolve_device
from ohlora.errors import PipelineError
from ohlora.layout import Layout, image_name, name_form
from ohlora.records import sha256_bytes, weights_digest
from ohlora.sharding import ShardRecords, Sharding, check_shard_option, merge_command, start
from ohlora.weights import fetch
from segmentation import facexformer
from segmentation.face_detection import FaceDetector
from segmentation.parsing import (InputImages, ParsingSummary, ShardStageRecord, StageRecord, check_outputs,
                                  is_finished, list_input_images, merge_shard_records, plan_work, read_skip_list,
                                  run_info, run_stage, stage2_empty_reason, stage_settings)


@dataclass(frozen=True)
class Stage3Request:
    root: str | Path | None = None
    weights: str | Path | None = None   # FaceXFormer checkpoint (default: the published one)
    images: str | Path | None = None    # input folder (default: the stage-2 filtered images)
    batch_size: int = 16
    seed: int = 0                       # recorded only: nothing in this stage is random
    device: str | None = None
    progress: bool = True
    shard: str | None = None            # 'i/n': this job's share of the images (then merge the shards)
    amp: bool = False                   # FaceXFormer under bfloat16 autocast (recorded in the settings)


@dataclass
class Stage3Report:
    layout: Layout
    images_dir: Path
    ignored: list[str]
    already_done: int
    settled_skips: int
    changed: int
    summary: ParsingSummary | None = None   # None: nothing was pending
    shard: str | None = None                # a --shard job: its share ('i/n'); the merge is still to come
    quiet: bool = False                     # a torchrun rank other than 0 prints nothing

    def lines(self) -> list[str]:
        if self.quiet:
            return []
        if self.shard is not None:
            parsed = self.summary.parsed if self.summary else 0
            skipped = len(self.summary.skipped) if self.summary else 0
            return [f'shard {self.shard}: parsed {parsed} images ({self.already_done} already there, {skipped} '
                    f'skipped) into {self.layout.segmentation_dir}; once every shard has finished, merge them: '
                    f'{stage3_merge_command(self.layout)}']
        out = []
        if self.ignored:
            out.append(f'ignoring {len(self.ignored)} files in {self.images_dir} that are not '
                       f'{name_form(image_name(0))} images (e.g. {self.ignored[0]})')
        if self.changed:
            out.append(f'{self.changed} images changed since they were parsed (other bytes under the same number); '
                       'parsed them again')
        earlier_skips = f', {self.settled_skips} skipped before' if self.settled_skips else ''
        segmentation_dir = self.layout.segmentation_dir
        if self.summary is None:
            out.append(f'nothing to do: {self.already_done} images parsed in {segmentation_dir}{earlier_skips}')
            return out
        skipped = (f'; skipped {len(self.summary.skipped)} (see {self.layout.segmentation_skipped_csv})'
                   if self.summary.skipped else '')
        out.append(f'parsed {self.summary.parsed} images ({self.already_done} already there{earlier_skips}){skipped}; '
                   f'results in {segmentation_dir}')
        return out


def stage3_merge_command(layout: Layout) -> str:
    return merge_command('3', layout.root)


def shard_records(layout: Layout) -> ShardRecords:
    return ShardRecords(layout.shard_records('3'), stage3_merge_command(layout))


def listing_digest(inputs: InputImages) -> str:
    """Which input files are split (every shard must split the same listing)."""
    return sha256_bytes('\n'.join(f'{n} {path.name}' for n, path in inputs.images).encode('utf-8'))


def _shard_key(layout: Layout, settings: dict, images_dir: Path, inputs: InputImages) -> dict:
    return {'settings': settings, 'images_dir': layout.path_from_root(images_dir),
            'inputs_sha256': listing_digest(inputs)}


def run_stage3(request: Stage3Request) -> Stage3Report:
    """Parse every input image that has no up-to-date results; see :mod:`segmentation.parsing`."""
    check_shard_option(request.shard)
    layout = Layout(request.root)
    images_dir = Path(request.images) if request.images else layout.filtered_dir
    inputs = list_input_images(images_dir, None if request.images else stage2_empty_reason(layout))
    check_outputs(layout)

    weights = fetch('facexformer', layout, request.weights)
    settings = stage_settings(weights_digest(weights), request.amp)
    sharding = start(resolve_device(request.device), request.shard)
    if sharding.active:
        return _parse_share(request, layout, sharding, images_dir, inputs, weights, settings)
    shard_records(layout).refuse_unmerged()
    work = plan_work(layout, inputs, settings)
    report = Stage3Report(layout, images_dir, inputs.ignored, work.finished, len(work.settled_skips), work.changed)
    if not work.pending:
        return report

    device = resolve_device(request.device)
    disable_tf32()
    model = facexformer.load_facexformer(weights, device)  # looked up at call time: tests stand in for it
    detector = FaceDetector()
    info = run_info(layout, images_dir=images_dir, weights=weights, device=device, batch_size=request.batch_size,
                    seed=request.seed, already_done=work.finished, ignored=inputs.ignored)
    report.summary = run_stage(layout, model, detector, work.pending, request.batch_size, device,
                               progress=request.progress, present={n for n, _ in inputs.images},
                               record=StageRecord(layout, settings, work.inputs, info), amp=request.amp)
    return report


def _parse_share(request: Stage3Request, layout: Layout, sharding: Sharding, images_dir: Path, inputs: InputImages,
                 weights: Path, settings: dict) -> Stage3Report:
    """This shard's images (positions k mod n = i of the listing) into its shard record; under torchrun rank 0
    then merges."""
    shard, records = sharding.shard, shard_records(layout)
    key = _shard_key(layout, settings, images_dir, inputs)
    own = records.check_start(shard, key)
    mine = InputImages([item for k, item in enumerate(inputs.images) if shard.owns(k)], inputs.ignored)
    numbers = {n for n, _ in mine.images}
    work = plan_work(layout, mine, settings, own)
    earlier = {**read_skip_list(layout.segmentation_skipped_csv),
               **{int(n): str(r) for n, r in (own or {}).get('skipped', {}).items()}}
    device = sharding.ctx.device
    info = run_info(layout, images_dir=images_dir, weights=weights, device=device, batch_size=request.batch_size,
                    seed=request.seed, already_done=work.finished, ignored=inputs.ignored)
    record = ShardStageRecord(layout, settings, work.inputs, info, records=records, shard=shard, key=key,
                              earlier_skips={n: r for n, r in earlier.items() if n in numbers},
                              already_done=work.finished)
    report = Stage3Report(layout, images_dir, inputs.ignored, work.finished, len(work.settled_skips), work.changed,
                          shard=str(shard))
    if work.pending:
        disable_tf32()
        model = facexformer.load_facexformer(weights, device)
        report.summary = run_stage(layout, model, FaceDetector(), work.pending, request.batch_size, device,
                                   progress=request.progress, present=numbers, record=record, amp=request.amp)
    else:
        record.write_skips({n: r for n, r in record.read_skips().items() if not is_finished(layout, n)})
    record.finish(report.summary.skipped if report.summary else {})
    if not sharding.torchrun:
        return report
    totals = sharding.ctx.all_gather_objects((work.finished, len(work.settled_skips), work.changed))
    merged = sharding.finish(lambda: merge_stage3_shards(layout.root))
    if merged is None:
        report.quiet = True
        return report
    merged.already_done, merged.settled_skips, merged.changed = (sum(t[k] for t in totals) for k in range(3))
    return merged


def merge_stage3_shards(root: str | Path | None) -> Stage3Report:
    """``merge_shards.py --stage 3``: ``segmentation_meta.json`` and ``skipped.csv`` of a split run, exactly as one
    process writes them (up to the maps' near-tie pixels, which the shards wrote themselves)."""
    layout = Layout(root)
    records = shard_records(layout)
    shards = records.collect()
    key = shards[0]['key']
    images_dir = layout.resolve_from_root(key['images_dir'])
    inputs = list_input_images(images_dir)
    if listing_digest(inputs) != key['inputs_sha256']:
        raise PipelineError(f'the images in {images_dir} changed since the shards ran; rerun every shard, then merge')
    check_outputs(layout)
    summary = merge_shard_records(layout, shards, key['settings'], inputs)
    records.remove()
    finished = sum(r.get('already_done', 0) for r in shards)
    return Stage3Report(layout, images_dir, inputs.ignored, finished, 0, 0, summary)
