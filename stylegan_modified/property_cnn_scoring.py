"""The property CNN's scores of every scored filtered image: ``all_scores_v2_cnn.csv`` and
``compare/all_scores_v2_vs_cnn.csv`` (PIPELINE.md §7.3, §9), the labels v3 trains on.

* Every image of the scores CSV (``all_scores_v2.csv``: the filtered images that stage 4 scored) is scored in
  **eval mode** under ``no_grad``, in batches. Upstream's pass ran with dropout active (R2, §13 row 13);
  ``compat='upstream'`` reproduces that, with each image's dropout drawn from (seed, img_no) alone, so the
  scores do not depend on the batch size (the spec's own compat advice for a faithful v3 rerun is to use
  upstream's published CSV instead).
* ``all_scores_v2_cnn.csv``: ``img_no,img_path,eyes_score,…,background_std_score``, sorted by img_no, no index
  column, ``img_path`` relative to the root (POSIX), scores rounded to 4 decimals and **not** re-normalised.
* ``compare/all_scores_v2_vs_cnn.csv``: ``img_no,img_path`` then ``{p}_v2,{p}_v2_cnn,{p}_diff`` for each
  property p (eyes … background_std), diff = \\|v2 − cnn\\| of the rounded values, rounded to 4 decimals.

Both CSVs are written atomically under the no-overwrite rule (a CSV this pass did not write, e.g. upstream's
published ``all_scores_v2_cnn.csv``, is never replaced without ``--overwrite``), and ``scoring_record.json``
says what produced them (the CNN's SHA-256, the scores' fingerprint, the mode, and where the CNN came from: its
file and the v2 run that trained it): a rerun with the same inputs finds them up to date and writes nothing.

The CSVs live in the root, whatever ``--outdir`` a v2 run has, so runs with different ``--outdir`` (or different
``--property-cnn``) share them. A CSV made by another CNN than this run's is therefore refused without
``--overwrite`` (:meth:`ScoringPass.check`): a v3 run trained on it would otherwise lose its labels without a
word. The same run's CNN (a later best epoch after ``--resume``) replaces its own CSVs as before. v3 reads the
record to check that its labels and its loss come from the same CNN (:func:`scores_record`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ohlora import atomic
from ohlora.devices import item_generator, tf32
from ohlora.errors import PipelineError
from ohlora.layout import PROPERTY_NAMES, SCORE_COLUMNS, Layout, image_name
from ohlora.owned_files import OwnedFiles
from ohlora.records import sha256_of
from stylegan_modified.attribute_metrics import pearson_r
from stylegan_modified.datasets import ScoredImageDataset
from stylegan_modified.property_cnn_training import DECIMALS
from stylegan_modified.property_score_cnn import PropertyScoreCNN
from stylegan_modified.training_control import ignore_stop_signals_in_worker, worker_error

DROPOUT_STREAM = 73  # item_generator stream of an image's dropout in compat mode
WAY_OUT = 'choose another --root, or pass --overwrite to replace it'


def compare_columns() -> list[str]:
    return ['img_no', 'img_path'] + [f'{p}_{kind}' for p in PROPERTY_NAMES for kind in ('v2', 'v2_cnn', 'diff')]


def score_dataset(model: PropertyScoreCNN, dataset: ScoredImageDataset, device: torch.device, batch_size: int = 16,
                  workers: int = 0, dropout_seed: int | None = None, progress: bool = False) -> np.ndarray:
    """(n, 7) float32 scores of every image of ``dataset`` in its order; eval mode, or with ``dropout_seed``
    train mode with each image's dropout drawn from (dropout_seed, img_no) (upstream's pass, compat only)."""
    model = model.to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == 'cuda', generator=torch.Generator(),
                        worker_init_fn=ignore_stop_signals_in_worker)
    scores = []
    was_training = model.training
    model.train(dropout_seed is not None)
    bar = tqdm(total=len(dataset), desc='property CNN scores', unit='img', disable=not progress)
    try:
        with torch.no_grad(), tf32(False):  # the labels of v3: full float32 whatever a trainer's --tf32 says
            for items in loader:
                images = items['image'].to(device, non_blocking=True)
                if dropout_seed is None:
                    scores.append(model(images).float().cpu())
                else:
                    for image, index in zip(images, items['index'].tolist()):
                        seed = item_generator(dropout_seed, dataset.img_nos[index], DROPOUT_STREAM).initial_seed()
                        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
                            torch.manual_seed(seed)
                            scores.append(model(image[None]).float().cpu())
                bar.update(len(images))
    except PipelineError as exc:
        raise worker_error(exc) from None
    finally:
        bar.close()
        model.train(was_training)
    result = torch.cat(scores).numpy()
    if not np.isfinite(result).all():
        raise PipelineError('the property CNN gave NaN or infinite scores; its weights are broken')
    return result


def scores_frames(layout: Layout, img_nos, labels: np.ndarray, scores: np.ndarray) -> tuple[pd.DataFrame,
                                                                                             pd.DataFrame]:
    """(all_scores_v2_cnn, all_scores_v2_vs_cnn) frames, sorted by img_no, values rounded to 4 decimals."""
    order = np.argsort(np.asarray(img_nos), kind='stable')
    img_nos = [int(img_nos[k]) for k in order]
    image_dir = layout.relative(layout.filtered_dir)
    paths = [f'{image_dir}/{image_name(n)}' for n in img_nos]
    cnn = np.round(np.asarray(scores, dtype=np.float64)[order], DECIMALS)
    v2 = np.round(np.asarray(labels, dtype=np.float64)[order], DECIMALS)
    diff = np.round(np.abs(v2 - cnn), DECIMALS)
    scores_frame = pd.DataFrame(cnn, columns=list(SCORE_COLUMNS))
    scores_frame.insert(0, 'img_path', paths)
    scores_frame.insert(0, 'img_no', img_nos)
    compare = {'img_no': img_nos, 'img_path': paths}
    for k, name in enumerate(PROPERTY_NAMES):
        compare.update({f'{name}_v2': v2[:, k], f'{name}_v2_cnn': cnn[:, k], f'{name}_diff': diff[:, k]})
    return scores_frame, pd.DataFrame(compare, columns=compare_columns())


def csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False, lineterminator='\n').encode('utf-8')


@dataclass
class ScoringResult:
    status: str                 # 'written' or 'up to date'
    outputs: tuple[Path, Path]
    images: int
    agreement: dict             # per property {'r', 'mae'} between the v2 scores and the CNN's


def read_scoring_record(layout: Layout) -> dict | None:
    """``scoring_record.json`` of the root, or None (absent or unreadable)."""
    try:
        recorded = json.loads(layout.property_cnn_scoring_record.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get('inputs'), dict) else None


def scores_record(layout: Layout, csv: Path) -> dict | None:
    """The scoring record if it describes ``csv`` as it is on disk (the root's ``all_scores_v2_cnn.csv`` with the
    bytes the record names), else None: e.g. upstream's published CSV, or a CSV from elsewhere."""
    recorded = read_scoring_record(layout)
    target = layout.property_cnn_scores_csv
    if recorded is None or not Path(csv).is_file() or not target.is_file():
        return None
    if Path(csv).resolve() != target.resolve():
        return None
    return recorded if recorded.get('outputs', {}).get(target.name) == sha256_of(target) else None


def describe_cnn(source: dict | None, cnn_sha256: str | None) -> str:
    """'the CNN of the v2 run R (F), SHA-256 1234abcd5678…' from a record's ``property_cnn`` entry."""
    source = source or {}
    if source.get('run'):
        where = f'the CNN of the v2 run {source["run"]} ({source.get("file")})'
    elif source.get('file'):
        where = f'--property-cnn {source["file"]}'
    else:
        where = 'an unrecorded CNN'
    return where + (f', SHA-256 {cnn_sha256[:16]}…' if cnn_sha256 else '')


class ScoringPass:
    """Writes the two CSVs of ``dataset`` (scores CSV + images) for one CNN, or finds them up to date."""

    def __init__(self, layout: Layout, dataset: ScoredImageDataset, *, device: torch.device, batch_size: int = 16,
                 workers: int = 0, compat: str | None = None, seed: int = 0, progress: bool = False):
        self.layout, self.dataset = layout, dataset
        self.device, self.batch_size, self.workers = device, batch_size, workers
        self.compat, self.seed, self.progress = compat, seed, progress
        self.outputs = (layout.property_cnn_scores_csv, layout.property_cnn_compare_csv)
        self.owned = OwnedFiles(layout.property_cnn_scoring_written, base=layout.root, way_out=WAY_OUT)

    @property
    def mode(self) -> dict:
        if self.compat == 'upstream':
            return {'mode': 'train (dropout on, compat upstream)', 'seed': self.seed}
        return {'mode': 'eval'}

    def check(self, overwrite: bool = False, source: dict | None = None, cnn_sha256: str | None = None) -> None:
        """Before anything is written: a CSV of these names that this pass did not write is refused, and so is one
        that another property CNN made, unless ``overwrite``. ``source`` is where this run's CNN comes from
        (``{'file': …, 'run': …}``, see :meth:`run`), ``cnn_sha256`` its SHA-256 when already known (a given file,
        a finished CNN run); a CNN still to be trained is this run's if the CSVs came from the same v2 run."""
        self.owned.check(self.outputs, overwrite)
        if overwrite or source is None:
            return
        recorded = scores_record(self.layout, self.outputs[0])
        if recorded is None:
            return
        theirs = recorded['inputs'].get('property_cnn_sha256')
        their_source = recorded.get('property_cnn') or {}
        if theirs == cnn_sha256 or (source.get('run') and their_source.get('run') == source['run']):
            return
        raise PipelineError(f'{self.outputs[0]} holds the scores of another property CNN '
                            f'({describe_cnn(their_source, theirs)}) than this run\'s '
                            f'({describe_cnn(source, cnn_sha256)}); replacing them would change the labels of a '
                            f'v3 run trained on them without a word: {WAY_OUT}')

    def _record(self, cnn_sha256: str) -> dict:
        return {'property_cnn_sha256': cnn_sha256, 'scores_fingerprint': self.dataset.fingerprint(),
                'scores_csv': self.dataset.scores_csv.name, 'images': len(self.dataset), **self.mode}

    def up_to_date(self, cnn_sha256: str) -> bool:
        recorded = read_scoring_record(self.layout)
        if recorded is None or recorded.get('inputs') != self._record(cnn_sha256):
            return False
        written = recorded.get('outputs', {})
        return all(p.is_file() and written.get(p.name) == sha256_of(p) for p in self.outputs)

    def run(self, model: PropertyScoreCNN, cnn_sha256: str, source: dict | None = None) -> ScoringResult:
        """Score every image with ``model`` (SHA-256 ``cnn_sha256``); ``source`` (recorded) says where the CNN came
        from: ``{'file': its path from the root, 'run': the v2 run folder that trained it, or None}``."""
        if self.up_to_date(cnn_sha256):
            return ScoringResult('up to date', self.outputs, len(self.dataset), self._agreement_from_csv())
        dropout_seed = self.seed if self.compat == 'upstream' else None
        scores = score_dataset(model, self.dataset, self.device, self.batch_size, self.workers, dropout_seed,
                               self.progress)
        frames = scores_frames(self.layout, self.dataset.img_nos, self.dataset.labels, scores)
        hashes = {}
        for path, frame in zip(self.outputs, frames):
            data = csv_bytes(frame)
            self.owned.write_bytes(path, data)
            hashes[path.name] = sha256_of(path)
        # The record goes last: its presence (with these hashes) marks the CSVs as complete.
        atomic.write_json(self.layout.property_cnn_scoring_record,
                          {'inputs': self._record(cnn_sha256), 'outputs': hashes, 'property_cnn': source or {},
                           'torch': torch.__version__})
        return ScoringResult('written', self.outputs, len(self.dataset), agreement(frames[1]))

    def _agreement_from_csv(self) -> dict:
        return agreement(pd.read_csv(self.outputs[1]))


def agreement(compare: pd.DataFrame) -> dict:
    """Per property: Pearson r and mean |diff| between the v2 scores and the CNN's (PIPELINE.md §9's table)."""
    return {p: {'r': float(pearson_r(compare[f'{p}_v2'], compare[f'{p}_v2_cnn'])),
                'mae': float(compare[f'{p}_diff'].mean())} for p in PROPERTY_NAMES}
