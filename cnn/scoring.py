"""Ensemble scoring of the unlabelled images, resumable, into ``cnn/inference_result/{gender,quality}.csv``.

One pass over the images feeds every batch to all models of both properties, so each JPEG is decoded once.
Rows are saved every ``checkpoint_every`` images; a rerun with the same models, mode and stage-1 images
scores only what is missing (and retries images that failed to read). Other settings start over.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from cnn.ensemble import ensemble_outputs, final_scores, round4, set_dropout
from cnn.images import IMAGE_SIZE, ImageFiles, image_loader, to_unit_range
from cnn.properties import FOLDS
from ohlora import atomic
from ohlora.devices import item_generator
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.weights import sha256_of

DROPOUT_STREAM = 20  # item_generator stream of the compat-mode dropout draws


def inference_columns(prop: str) -> list[str]:
    return ['img_no', 'img_path', f'property_{prop}_final_score'] + [f'score_model_{k}' for k in range(FOLDS)]


def scoring_settings(weights: dict[str, list[Path]], stage1_meta: dict | None, dropout: bool, seed: int,
                     batch_size: int) -> dict:
    """What the scores depend on; rows made under other settings are not reused."""
    settings = {'models': {prop: [sha256_of(p) for p in paths] for prop, paths in sorted(weights.items())},
                'stage1': stage1_meta, 'mode': 'dropout on (--compat upstream)' if dropout else 'eval'}
    if dropout:  # the dropout draws depend on the seed and on how images are batched
        settings.update(seed=seed, batch_size=batch_size)
    return settings


@dataclass
class ScoringResult:
    frames: dict[str, pd.DataFrame]   # property -> inference rows, ascending img_no
    skipped: list[tuple[int, str]]    # (img_no, reason) of images that could not be scored
    scored_now: int                   # images scored in this run (the rest were reused)


def _read_record(layout: Layout) -> dict | None:
    path = layout.cnn_record('scoring')
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _previous_rows(layout: Layout, props: list[str]) -> dict[str, pd.DataFrame] | None:
    frames = {}
    for prop in props:
        path = layout.cnn_inference_csv(prop)
        try:
            frame = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            return None
        if list(frame.columns) != inference_columns(prop) or frame.isna().any().any():
            return None
        frames[prop] = frame
    return frames


def _empty(prop: str) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype='int64' if c == 'img_no' else 'float64') for c in inference_columns(prop)})


def _save(layout: Layout, frames: dict[str, pd.DataFrame]) -> None:
    for prop, frame in frames.items():
        atomic.write_csv(layout.cnn_inference_csv(prop), frame.sort_values('img_no', kind='stable'))


def resume_rows(layout: Layout, props: list[str], settings: dict, todo: set[int]) -> dict[str, pd.DataFrame]:
    """Rows of an earlier run with the same settings for images still to score; otherwise a clean start."""
    record = _read_record(layout)
    previous = _previous_rows(layout, props) if record is not None and record.get('settings') == settings else None
    if previous is None:
        stale = [layout.cnn_inference_csv(p) for p in props if layout.cnn_inference_csv(p).exists()]
        if stale:
            print(f'earlier scores in {stale[0].parent} were made with other models or settings; scoring again')
        # Old CSVs go before the new record is written, so a crash can never pair old rows with new settings.
        for path in stale:
            path.unlink()
        atomic.write_json(layout.cnn_record('scoring'), {'settings': settings})
        return {prop: _empty(prop) for prop in props}
    common = set.intersection(*(set(frame['img_no'].tolist()) for frame in previous.values())) & todo
    return {prop: frame[frame['img_no'].isin(common)].reset_index(drop=True) for prop, frame in previous.items()}


def score_images(layout: Layout, ensembles: dict[str, list[nn.Module]], img_nos: list[int], settings: dict, *,
                 device: torch.device, batch_size: int = 32, workers: int = 0, dropout_seed: int | None = None,
                 checkpoint_every: int = 1024, progress: bool = True) -> ScoringResult:
    """Score ``img_nos`` with every ensemble; ``dropout_seed`` switches on upstream's dropout-on scoring."""
    props = list(ensembles)
    todo = set(int(n) for n in img_nos)
    frames = resume_rows(layout, props, settings, todo)
    done = set(frames[props[0]]['img_no'].tolist()) if props else set()
    remaining = sorted(todo - done)
    if remaining and done:
        print(f'reusing {len(done)} scores of an earlier run; scoring the other {len(remaining)} images')
    for models in ensembles.values():
        set_dropout(models, dropout_seed is not None)

    dataset = ImageFiles(remaining, [layout.synthesized_image(n) for n in remaining], size=IMAGE_SIZE)
    pending: dict[str, list[dict]] = {prop: [] for prop in props}
    skipped: list[tuple[int, str]] = []
    since_save = 0
    bar = tqdm(total=len(remaining), desc='scoring', unit='img', disable=not progress)
    for batch in image_loader(dataset, batch_size, device, workers):
        skipped.extend(batch.failed)
        bar.update(len(batch.img_nos) + len(batch.failed))
        if not batch.img_nos:
            continue
        images = to_unit_range(batch.images.to(device, non_blocking=True))
        for prop, models in ensembles.items():
            if dropout_seed is None:
                outputs = ensemble_outputs(models, images)
            else:
                # Dropout draws depend on (seed, first image of the batch): reruns give the same scores.
                with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
                    torch.manual_seed(item_generator(dropout_seed, batch.img_nos[0], DROPOUT_STREAM).initial_seed())
                    outputs = ensemble_outputs(models, images)
            finals, rounded = final_scores(outputs), round4(outputs)
            for row, img_no in enumerate(batch.img_nos):
                record = {'img_no': img_no, 'img_path': layout.relative(layout.synthesized_image(img_no)),
                          f'property_{prop}_final_score': finals[row]}
                record.update({f'score_model_{k}': rounded[row, k] for k in range(outputs.shape[1])})
                pending[prop].append(record)
        since_save += len(batch.img_nos)
        if since_save >= checkpoint_every:
            frames = _merge(frames, pending)
            _save(layout, frames)
            since_save = 0
    bar.close()
    frames = _merge(frames, pending)
    if remaining or not all(layout.cnn_inference_csv(p).is_file() for p in props):
        _save(layout, frames)
    if props and frames[props[0]].empty and skipped:
        raise PipelineError(f'none of the {len(skipped)} images could be scored (first: {skipped[0][1]})')
    return ScoringResult(frames, sorted(skipped), len(remaining) - len(skipped))


def _merge(frames: dict[str, pd.DataFrame], pending: dict[str, list[dict]]) -> dict[str, pd.DataFrame]:
    merged = {}
    for prop, frame in frames.items():
        if pending[prop]:
            new = pd.DataFrame(pending[prop], columns=inference_columns(prop))
            frame = new if frame.empty else pd.concat([frame, new], ignore_index=True)
            pending[prop] = []
        merged[prop] = frame.sort_values('img_no', kind='stable').reset_index(drop=True)
    return merged


def final_column(frame: pd.DataFrame, prop: str) -> dict[int, float]:
    return dict(zip(frame['img_no'].astype(int), frame[f'property_{prop}_final_score'].astype(np.float64)))
