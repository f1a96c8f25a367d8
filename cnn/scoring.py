"""Ensemble scoring of the unlabelled images, resumable, into ``cnn/inference_result/{gender,quality}.csv``.

One pass over the images feeds every batch to all models of both properties, so each JPEG is decoded once.
The final CSVs are written only when every image has been scored: until then rows are saved every
``checkpoint_every`` images to ``cnn/records/scoring_{prop}.partial.csv``, so a crash never leaves half a table
under a final name. ``cnn/records/scoring.json`` holds the settings the rows were made with (the models by the
SHA-256 of their files), the SHA-256 of every scored image and, once finished, of each final CSV. A rerun with the
same models and mode reuses the rows of images whose bytes are unchanged and scores the rest (new, replaced or
earlier unreadable images); other settings start over, and the earlier final CSVs stay in place until the new ones
replace them.

A split run (``--shard i/n`` or torchrun) scores the whole batches k with k mod n = i of the images one process
would score, so every image is scored in the batch one process scores it in. A shard reads the final CSVs (never
writes them) and keeps its rows in its own data files beside its shard record; :func:`merge_shard_rows` gathers
them for :func:`finish`, which writes exactly what one process writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from cnn.ensemble import ensemble_outputs, final_scores, round4, set_dropout
from cnn.images import IMAGE_HW, ImageFiles, image_loader, to_unit_range
from ohlora import atomic
from ohlora.amp import AMP_NAME, autocast
from ohlora.constants import NUM_FOLDS
from ohlora.devices import item_generator
from ohlora.errors import PipelineError
from ohlora.distributed import Shard
from ohlora.layout import Layout, image_name
from ohlora.records import aligned_batches, load_record, sha256_bytes, sha256_of, weights_digest
from ohlora.sharding import ShardRecords

DROPOUT_STREAM = 20  # item_generator stream of the compat-mode dropout draws


IMAGE_DIGEST = 'image_sha256'  # column of the partial rows: the content each row was scored from


def inference_columns(prop: str) -> list[str]:
    return ['img_no', 'img_path', f'property_{prop}_final_score'] + [f'score_model_{k}' for k in range(NUM_FOLDS)]


def partial_columns(prop: str) -> list[str]:
    return inference_columns(prop) + [IMAGE_DIGEST]


def scoring_settings(weights: dict[str, list[Path]], dropout: bool, seed: int, batch_size: int,
                     amp: bool = False) -> dict:
    """What the scores depend on besides each image's content; rows made under other settings are not reused."""
    settings = {'models': {prop: [weights_digest(p) for p in paths] for prop, paths in sorted(weights.items())},
                'mode': 'dropout on (--compat upstream)' if dropout else 'eval'}
    if dropout:  # the dropout draws depend on the seed and on how images are batched
        settings.update(seed=seed, batch_size=batch_size)
    if amp:  # float32 settings stay as they were
        settings['amp'] = AMP_NAME
    return settings


@dataclass
class ScoringResult:
    frames: dict[str, pd.DataFrame]   # property -> inference rows, ascending img_no
    skipped: list[tuple[int, str]]    # (img_no, reason) of images that could not be scored
    scored_now: int                   # images scored in this run (the rest were reused)
    changed: int = 0                  # images scored before whose file has changed since: scored again
    reused: int = 0                   # images whose scores of an earlier run were kept
    replaced: Path | None = None      # folder of earlier final scores made with other models or settings


def _read_rows(path: Path, columns: list[str]) -> pd.DataFrame | None:
    """The rows of a scores CSV of ours, or None when it is missing or not one."""
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    if list(frame.columns) != columns or frame.isna().any().any():
        return None
    return frame.astype({'img_no': 'int64'})


def _empty(prop: str) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype='int64' if c == 'img_no' else 'object' if c == IMAGE_DIGEST
                                      else 'float64') for c in partial_columns(prop)})


def _csv_text(frame: pd.DataFrame, columns: list[str]) -> str:
    return frame.sort_values('img_no', kind='stable').loc[:, columns].to_csv(index=False, lineterminator='\n')


def _save_partial(layout: Layout, frames: dict[str, pd.DataFrame]) -> None:
    for prop, frame in frames.items():
        atomic.write_text(layout.cnn_partial_scores(prop), _csv_text(frame, partial_columns(prop)))


def _file_digest(path: Path) -> str | None:
    try:
        return sha256_of(path)
    except OSError:
        return None


def resume_rows(layout: Layout, props: list[str], settings: dict,
                todo: set[int]) -> tuple[dict[str, pd.DataFrame], int, Path | None]:
    """Rows made with ``settings`` (finished CSVs the record vouches for, plus partial progress) for images still
    to score whose file holds the bytes that were scored, and how many scored images changed since; otherwise a
    clean start, and the folder of the earlier final CSVs it will replace (None when there are none)."""
    record = load_record(layout.cnn_scoring_record)
    if record is None or record.get('settings') != settings:
        finals = [layout.cnn_inference_csv(p) for p in props if layout.cnn_inference_csv(p).exists()]
        # Partial rows go before the record names the new settings, so a crash never pairs old rows with them.
        for prop in props:
            layout.cnn_partial_scores(prop).unlink(missing_ok=True)
        atomic.write_json(layout.cnn_scoring_record, {'settings': settings})
        return {prop: _empty(prop) for prop in props}, 0, finals[0].parent if finals else None
    vouched = record.get('outputs') or {}
    scored_from = record.get('images') if isinstance(record.get('images'), dict) else {}
    previous = {}
    for prop in props:
        final = layout.cnn_inference_csv(prop)
        parts = []
        if vouched.get(prop) and final.is_file() and sha256_of(final) == vouched.get(prop):
            rows = _read_rows(final, inference_columns(prop))
            if rows is not None:
                rows[IMAGE_DIGEST] = [scored_from.get(str(n)) for n in rows['img_no']]
                parts.append(rows.dropna(subset=[IMAGE_DIGEST]))
        parts.append(_read_rows(layout.cnn_partial_scores(prop), partial_columns(prop)))
        parts = [part for part in parts if part is not None and not part.empty]
        frame = pd.concat(parts, ignore_index=True).drop_duplicates('img_no', keep='last') if parts else _empty(prop)
        previous[prop] = frame
    common = set.intersection(*(set(frame['img_no'].tolist()) for frame in previous.values())) & todo
    # Keyed on content: a row is reused only for the bytes it was scored from (a replaced image is scored again).
    current = {n: _file_digest(layout.synthesized_image(n)) for n in sorted(common)}
    kept, changed = {}, set()
    for prop, frame in previous.items():
        same = np.array([n in current and current[n] == digest
                         for n, digest in zip(frame['img_no'], frame[IMAGE_DIGEST])], dtype=bool)
        changed |= {int(n) for n, ok in zip(frame['img_no'], same) if n in current and not ok}
        kept[prop] = frame[same]
    common = set.intersection(*(set(frame['img_no'].tolist()) for frame in kept.values())) if kept else set()
    return {prop: frame[frame['img_no'].isin(common)].reset_index(drop=True) for prop, frame in kept.items()}, \
        len(changed), None


def finish(layout: Layout, frames: dict[str, pd.DataFrame], settings: dict) -> None:
    """Write the final CSVs (those whose content changed), vouch for them and for the image bytes each row was
    scored from in the record, drop partial rows."""
    digests, images = {}, {}
    for prop, frame in frames.items():
        path, text = layout.cnn_inference_csv(prop), _csv_text(frame, inference_columns(prop))
        if not (path.is_file() and path.read_text() == text):
            atomic.write_text(path, text)
        digests[prop] = sha256_bytes(text.encode('utf-8'))
        images.update({str(int(n)): d for n, d in zip(frame['img_no'], frame[IMAGE_DIGEST])})
    images = dict(sorted(images.items(), key=lambda item: int(item[0])))
    record = {'settings': settings, 'outputs': digests, 'images': images}
    if load_record(layout.cnn_scoring_record) != record:
        atomic.write_json(layout.cnn_scoring_record, record)
    for prop in frames:  # only after the record: until then they are the only trusted copy of new rows
        layout.cnn_partial_scores(prop).unlink(missing_ok=True)


def score_images(layout: Layout, ensembles: dict[str, list[nn.Module]], img_nos: list[int], settings: dict, *,
                 device: torch.device, batch_size: int = 32, workers: int = 0, dropout_seed: int | None = None,
                 checkpoint_every: int = 1024, progress: bool = True) -> ScoringResult:
    """Score ``img_nos`` with every ensemble; ``dropout_seed`` switches on upstream's dropout-on scoring."""
    props = list(ensembles)
    todo = set(int(n) for n in img_nos)
    frames, changed, replaced = resume_rows(layout, props, settings, todo)
    done = set(frames[props[0]]['img_no'].tolist()) if props else set()
    remaining = sorted(todo - done)
    frames, skipped = _score(layout, ensembles, frames, remaining, lambda rows: _save_partial(layout, rows),
                             device=device, batch_size=batch_size, workers=workers, dropout_seed=dropout_seed,
                             amp='amp' in settings, checkpoint_every=checkpoint_every, progress=progress)
    require_some_scores(frames, skipped)
    finish(layout, frames, settings)
    return ScoringResult(frames, sorted(skipped), len(remaining) - len(skipped), changed, len(done), replaced)


def shard_images(img_nos: list[int], batch_size: int, shard: Shard) -> list[int]:
    """The images of a shard: the whole batches k (of ``batch_size`` images, as one process forms them from
    ``img_nos``) with k mod n = i."""
    return [n for batch in aligned_batches(list(img_nos), set(), batch_size, shard) for n in batch]


def _shard_rows(records: ShardRecords, shard: Shard, prop: str) -> Path:
    return records.files.data(shard.index, shard.count, prop)


def score_shard(layout: Layout, ensembles: dict[str, list[nn.Module]], img_nos: list[int], settings: dict, *,
                shard: Shard, records: ShardRecords, key: dict, device: torch.device, batch_size: int = 32,
                workers: int = 0, dropout_seed: int | None = None, checkpoint_every: int = 1024,
                progress: bool = True) -> ScoringResult:
    """Score this shard's share of ``img_nos`` (see :func:`shard_images`) into its shard record and data files;
    rows of the final CSVs (when made with ``settings``) and of this shard's earlier run are reused for images
    whose bytes are unchanged. Nothing shared is written."""
    props = list(ensembles)
    own = records.check_start(shard, key)
    # One process reuses the rows of the final CSVs and scores the other images in batches from the first of them
    # (with --compat upstream the dropout draws depend on those batches): the shards split those batches, and carry
    # the reused rows in turn. Only the merge writes the final CSVs, so every shard sees the same earlier rows (unless
    # a stage-1 image changes between their runs: merge_shard_rows refuses the overlap or gap that can follow).
    earlier, _ = _reusable_rows(layout, props, settings, set(img_nos), [])
    reused = set(earlier[props[0]]['img_no'].tolist()) if props else set()
    mine = shard_images([n for n in img_nos if n not in reused], batch_size, shard)
    carried = shard_images(sorted(reused), batch_size, shard)
    frames, changed = _reusable_rows(layout, props, settings, set(mine) | set(carried),
                                     [_shard_rows(records, shard, prop) for prop in props] if own else [])
    done = set(frames[props[0]]['img_no'].tolist()) if props else set()
    remaining = [n for n in mine if n not in done]

    def save(rows: dict[str, pd.DataFrame], finished: bool = False, skipped=()) -> None:
        for prop, frame in rows.items():
            atomic.write_text(_shard_rows(records, shard, prop), _csv_text(frame, partial_columns(prop)))
        records.write(shard, key, finished=finished, skipped=[[int(n), str(r)] for n, r in skipped],
                      scored=len(remaining) - len(skipped), reused=len(done), changed=changed)

    frames, skipped = _score(layout, ensembles, frames, remaining, save, device=device, batch_size=batch_size,
                             workers=workers, dropout_seed=dropout_seed, amp='amp' in settings,
                             checkpoint_every=checkpoint_every, progress=progress)
    save(frames, finished=True, skipped=sorted(skipped))
    return ScoringResult(frames, sorted(skipped), len(remaining) - len(skipped), changed, len(done))


def _reusable_rows(layout: Layout, props: list[str], settings: dict, todo: set[int],
                   extra: list[Path]) -> tuple[dict[str, pd.DataFrame], int]:
    """Rows a shard may reuse, read only: the final CSVs' (when the record vouches for them and names
    ``settings``) and those in ``extra`` (its own earlier rows, one file per property), for images in ``todo``
    whose file still holds the bytes scored."""
    record = load_record(layout.cnn_scoring_record)
    same = record is not None and record.get('settings') == settings
    vouched = (record.get('outputs') or {}) if same else {}
    scored_from = record.get('images') if same and isinstance(record.get('images'), dict) else {}
    previous = {}
    for position, prop in enumerate(props):
        parts = []
        final = layout.cnn_inference_csv(prop)
        if vouched.get(prop) and final.is_file() and sha256_of(final) == vouched.get(prop):
            rows = _read_rows(final, inference_columns(prop))
            if rows is not None:
                rows[IMAGE_DIGEST] = [scored_from.get(str(n)) for n in rows['img_no']]
                parts.append(rows.dropna(subset=[IMAGE_DIGEST]))
        if extra:
            parts.append(_read_rows(extra[position], partial_columns(prop)))
        parts = [part for part in parts if part is not None and not part.empty]
        frame = pd.concat(parts, ignore_index=True).drop_duplicates('img_no', keep='last') if parts else _empty(prop)
        previous[prop] = frame[frame['img_no'].isin(todo)]
    common = set.intersection(*(set(frame['img_no'].tolist()) for frame in previous.values())) if previous else set()
    current = {n: _file_digest(layout.synthesized_image(n)) for n in sorted(common)}
    kept, changed = {}, set()
    for prop, frame in previous.items():
        same_bytes = np.array([n in current and current[n] == digest
                               for n, digest in zip(frame['img_no'], frame[IMAGE_DIGEST])], dtype=bool)
        changed |= {int(n) for n, ok in zip(frame['img_no'], same_bytes) if n in current and not ok}
        kept[prop] = frame[same_bytes]
    common = set.intersection(*(set(frame['img_no'].tolist()) for frame in kept.values())) if kept else set()
    return {prop: frame[frame['img_no'].isin(common)].sort_values('img_no', kind='stable').reset_index(drop=True)
            for prop, frame in kept.items()}, len(changed)


def merge_shard_rows(records: ShardRecords, shards: list[dict], props: list[str],
                     img_nos: list[int]) -> tuple[dict[str, pd.DataFrame], list[tuple[int, str]]]:
    """The rows of every shard, as one run's frames, and the images they skipped; an image of ``img_nos`` that no
    shard scored or skipped is a one-line error."""
    frames, skipped = {}, []
    for record in shards:
        skipped += [(int(n), str(reason)) for n, reason in record.get('skipped', [])]
    for prop in props:
        parts = []
        for record in shards:
            path = records.files.data(record['index'], record['count'], prop)
            rows = _read_rows(path, partial_columns(prop))
            if rows is None and path.exists():
                raise PipelineError(f'{path} is not a scores file of this stage; rerun shard '
                                    f'{record["index"]}/{record["count"]}')
            if rows is not None:
                parts.append(rows)
        frame = pd.concat(parts, ignore_index=True) if parts else _empty(prop)
        twice = frame['img_no'][frame['img_no'].duplicated()]
        if len(twice):  # the shards saw other reusable scores: a stage-1 image changed between their runs
            raise PipelineError(f'image {int(twice.iloc[0]):06d} was scored by two shards (a stage-1 image changed '
                                'while the shards ran?); rerun every shard, then merge')
        frames[prop] = frame.sort_values('img_no', kind='stable').reset_index(drop=True)
    covered = set.intersection(*(set(frame['img_no'].tolist()) for frame in frames.values())) | {n for n, _ in skipped}
    lost = [n for n in img_nos if n not in covered]
    if lost:
        raise PipelineError(f'no shard scored image {lost[0]:06d} ({len(lost)} images in all); rerun the shards with '
                            'the same stage-1 images and options, then merge')
    return frames, sorted(skipped)


def _score(layout: Layout, ensembles: dict[str, list[nn.Module]], frames: dict[str, pd.DataFrame],
           remaining: list[int], save, *, device: torch.device, batch_size: int, workers: int,
           dropout_seed: int | None, amp: bool, checkpoint_every: int,
           progress: bool) -> tuple[dict[str, pd.DataFrame], list[tuple[int, str]]]:
    """Score ``remaining`` in batches of ``batch_size`` (in this order) onto ``frames``; ``save(frames)`` keeps
    the rows every ``checkpoint_every`` images and on Ctrl-C. Returns the frames and the unreadable images."""
    props = list(ensembles)
    for models in ensembles.values():
        set_dropout(models, dropout_seed is not None)
    image_dir = layout.relative(layout.synthesized_dir)
    dataset = ImageFiles(remaining, [layout.synthesized_image(n) for n in remaining], size=IMAGE_HW)
    pending: dict[str, list[dict]] = {prop: [] for prop in props}
    skipped: list[tuple[int, str]] = []
    since_save = 0
    bar = tqdm(total=len(remaining), desc='scoring', unit='img', disable=not progress)
    try:
        for batch in image_loader(dataset, batch_size, device, workers):
            skipped.extend(batch.failed)
            bar.update(len(batch.img_nos) + len(batch.failed))
            if not batch.img_nos:
                continue
            images = to_unit_range(batch.images.to(device, non_blocking=True))
            for prop, models in ensembles.items():
                if dropout_seed is None:
                    with autocast(device, amp):
                        outputs = ensemble_outputs(models, images)
                else:
                    # Dropout draws depend on (seed, first image of the batch): reruns give the same scores.
                    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), \
                            autocast(device, amp):
                        torch.manual_seed(item_generator(dropout_seed, batch.img_nos[0], DROPOUT_STREAM).initial_seed())
                        outputs = ensemble_outputs(models, images)
                finals, rounded = final_scores(outputs), round4(outputs)
                for row, img_no in enumerate(batch.img_nos):
                    record = {'img_no': img_no, 'img_path': f'{image_dir}/{image_name(img_no)}',
                              f'property_{prop}_final_score': finals[row]}
                    record.update({f'score_model_{k}': rounded[row, k] for k in range(outputs.shape[1])})
                    record[IMAGE_DIGEST] = batch.digests[row]
                    pending[prop].append(record)
            since_save += len(batch.img_nos)
            if since_save >= checkpoint_every:
                frames = _merge(frames, pending)
                save(frames)
                since_save = 0
    except KeyboardInterrupt:  # keep what was scored; the rerun resumes from it
        if any(pending.values()):
            save(_merge(frames, pending))
        raise
    finally:
        bar.close()
    return _merge(frames, pending), skipped


def require_some_scores(frames: dict[str, pd.DataFrame], skipped: list[tuple[int, str]]) -> None:
    if frames and next(iter(frames.values())).empty and skipped:
        raise PipelineError(f'none of the {len(skipped)} images could be scored (first: {sorted(skipped)[0][1]})')


def _merge(frames: dict[str, pd.DataFrame], pending: dict[str, list[dict]]) -> dict[str, pd.DataFrame]:
    merged = {}
    for prop, frame in frames.items():
        if pending[prop]:
            new = pd.DataFrame(pending[prop], columns=partial_columns(prop))
            frame = new if frame.empty else pd.concat([frame, new], ignore_index=True)
            pending[prop] = []
        merged[prop] = frame.sort_values('img_no', kind='stable').reset_index(drop=True)
    return merged


def final_column(frame: pd.DataFrame, prop: str) -> dict[int, float]:
    return dict(zip(frame['img_no'].astype(int), frame[f'property_{prop}_final_score'].astype(np.float64)))
