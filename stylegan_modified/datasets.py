"""The training data of every stage-5 trainer: filtered images with their property scores, and the batch order.

:class:`ScoredImageDataset` is "the filtered images + a scores CSV" (PIPELINE.md §7.1), shared by v1 (algorithm-1
``all_scores.csv``), v2 (``all_scores_v2.csv``) and v3 (``all_scores_v2_cnn.csv``):

* the CSV may be upstream's (unnamed index column, absolute Windows ``img_path``) or the project's; ``img_path``
  is ignored and every image is located by ``img_no`` in the filtered-images folder (R4);
* the labels are float32 [N, 7] in the standard order (R12); missing columns, empty/NaN, non-numeric or
  infinite values, and bad or repeated img_nos are one-line errors;
* :meth:`ScoredImageDataset.verify` checks that every image exists and decodes to the expected size, so a bad
  file stops the run before training instead of in epoch 7;
* an item is ``{'image': float32 [3, H, W] in [-1, 1], 'label': float32 [7], 'index': int}``; the image is
  upstream's ``ToTensor`` then ``Normalize(0.5, 0.5)``: ``(x / 255 - 0.5) / 0.5`` in float32.

Batch order: :func:`epoch_order` is a permutation that depends only on (seed, epoch), recorded in the resume
record; :func:`epoch_batches` cuts it into batches under the minibatch-stddev rule of the discriminators
(:func:`check_batch_size`): D views a batch of N as min(G, N) groups (G = 16), so N must be a multiple of G
when N > G. A batch size that breaks this is refused up front. The last partial batch of an epoch (4,703
images at 16: 15) is kept when the rule allows it (N <= G, or a multiple of G), as upstream; otherwise it is
trimmed to the largest multiple of G, and the few images left out differ from epoch to epoch (the order is
reshuffled).

Several processes (torchrun, :mod:`stylegan_modified.ddp`): ``batch_size`` stays the batch of one step, over all
processes; each rank trains on its strided share (:func:`rank_share`), so the ranks see disjoint images whose union
is the batch one process would train on. The batch must split evenly, and each share obeys the minibatch-stddev
rule on its own (D groups the images of one process). The last partial batch is trimmed to equal shares (at most
``world_size - 1`` images more left out, a different few each epoch).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cnn.images import decode_rgb
from ohlora.constants import IMAGE_SIZE, SCORE_COLUMNS
from ohlora.devices import item_generator
from ohlora.errors import PipelineError, first_line
from ohlora.layout import Layout
from ohlora.tables import float32_matrix, read_table
from stylegan_modified.training_control import ignore_stop_signals_in_worker

DATA_ORDER_STREAM = 50  # item_generator stream of the per-epoch permutation


class ScoredImageDataset(Dataset):
    """Images located by ``img_no`` (``image_path(img_no)``) with float32 labels from a scores CSV."""

    def __init__(self, scores_csv: str | Path, image_path: Callable[[int], Path],
                 columns: Sequence[str] = SCORE_COLUMNS, image_size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE),
                 what: str = 'property scores CSV'):
        self.scores_csv = Path(scores_csv)
        self.columns = tuple(columns)
        self.image_size = tuple(image_size)
        frame = read_table(self.scores_csv, ('img_no', *self.columns), what)
        self.labels = float32_matrix(frame, self.columns, self.scores_csv, what)
        self.img_nos = _img_nos(frame['img_no'], self.scores_csv)
        self.paths = [Path(image_path(n)) for n in self.img_nos]

    @classmethod
    def filtered(cls, layout: Layout, scores_csv: str | Path, **kwargs) -> 'ScoredImageDataset':
        """The stage-2 filtered images of ``layout`` with the scores of ``scores_csv``."""
        return cls(scores_csv, layout.filtered_image, **kwargs)

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the img_nos and labels: what the run trains on."""
        digest = hashlib.sha256(np.asarray(self.img_nos, dtype='<i8').tobytes())
        digest.update(np.ascontiguousarray(self.labels, dtype='<f4').tobytes())
        return digest.hexdigest()[:16]

    def _read(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            image = decode_rgb(path)
        except (RuntimeError, OSError, ValueError) as exc:
            raise PipelineError(f'{path} (img_no {self.img_nos[index]} of {self.scores_csv.name}) cannot be decoded: '
                                f'{first_line(exc, 120)}') from None
        if tuple(image.shape[-2:]) != self.image_size:
            height, width = image.shape[-2:]
            raise PipelineError(f'{path} is {width}x{height}; training needs {self.image_size[1]}x'
                                f'{self.image_size[0]} images')
        return image

    def __getitem__(self, index: int) -> dict:
        image = self._read(index).float().div(255)
        image = image.sub_(0.5).div_(0.5)  # Normalize(0.5, 0.5), upstream's order of operations
        return {'image': image, 'label': torch.from_numpy(self.labels[index]), 'index': index}

    def verify(self, workers: int = 0, progress: bool = False) -> None:
        """Every image exists and decodes to ``image_size``; else one line naming the first bad file."""
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            more = f' and {len(missing) - 1} more' if len(missing) > 1 else ''
            raise PipelineError(f'{missing[0]} does not exist{more} (img_nos of {self.scores_csv} without an image); '
                                'run stage 2 first or pass the --scores CSV that belongs to these images')
        loader = DataLoader(_DecodeCheck(self), batch_size=32, num_workers=workers, collate_fn=_as_list,
                            worker_init_fn=ignore_stop_signals_in_worker)
        bar = tqdm(total=len(self), desc='checking images', unit='img', disable=not progress)
        try:
            for rows in loader:
                for problem in rows:
                    if problem:
                        raise PipelineError(problem)
                bar.update(len(rows))
        finally:
            bar.close()


def _as_list(rows: list) -> list:
    return rows


class _DecodeCheck(Dataset):
    """Decodes each image and returns the one-line problem (or None), so worker processes check in parallel."""

    def __init__(self, dataset: ScoredImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str | None:
        try:
            self.dataset._read(index)
        except PipelineError as exc:
            return str(exc)
        return None


def _img_nos(column, path: Path) -> list[int]:
    values = np.asarray(column)
    if not np.issubdtype(values.dtype, np.integer):
        numeric = np.asarray(column.astype(str).str.fullmatch(r'\s*\d+(\.0*)?\s*'))
        if not numeric.all():
            row = int(np.flatnonzero(~numeric)[0])
            raise PipelineError(f'{path} has an img_no that is not a whole number >= 0 ({values[row]!r} at data '
                                f'row {row})')
        values = np.asarray(column.astype(float)).astype(np.int64)
    if (values < 0).any():
        raise PipelineError(f'{path} has a negative img_no ({int(values[values < 0][0])})')
    unique, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        raise PipelineError(f'{path} lists img_no {int(unique[counts > 1][0])} more than once')
    return [int(v) for v in values]


def minibatch_std_group_size(discriminator: torch.nn.Module) -> int:
    """The largest minibatch-stddev group of ``discriminator`` (1 when it has none)."""
    sizes = [m.group_size for m in discriminator.modules() if type(m).__name__ == 'MiniBatchSTDLayer']
    return max(sizes, default=1)


def check_batch_size(batch_size: int, group_size: int, option: str = '--batch-size', world_size: int = 1) -> None:
    """A batch of N is cut into min(G, N) groups; N > G must therefore be a multiple of G. With several
    processes the batch must split evenly among them and the rule holds for each process's share."""
    if batch_size < 1:
        raise PipelineError(f'{option} must be at least 1, got {batch_size}')
    if world_size > 1:
        if batch_size % world_size:
            below = batch_size - batch_size % world_size
            raise PipelineError(f'{option} {batch_size} is the batch of one step over all {world_size} processes and '
                                f'must split evenly among them (e.g. {below or world_size} or {below + world_size})')
        share = batch_size // world_size
        if share > group_size > 1 and share % group_size:
            raise PipelineError(f'{option} {batch_size} gives each of the {world_size} processes {share} images, '
                                f'which cannot be split into the discriminator\'s minibatch-stddev groups of '
                                f'{group_size}; use a batch of {group_size * world_size} or a multiple of it')
        return
    if batch_size > group_size > 1 and batch_size % group_size:
        below = batch_size - batch_size % group_size
        raise PipelineError(f'{option} {batch_size} cannot be split into the discriminator\'s minibatch-stddev groups '
                            f'of {group_size}; use at most {group_size} or a multiple of it (e.g. {below} or '
                            f'{below + group_size})')


def epoch_order(seed: int, epoch: int, size: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch`` (int64 [size]); depends only on (seed, epoch)."""
    return torch.randperm(size, generator=item_generator(seed, epoch, DATA_ORDER_STREAM))


def epoch_batches(order: torch.Tensor | Sequence[int], batch_size: int, group_size: int,
                  world_size: int = 1) -> list[list[int]]:
    """``order`` cut into batches of ``batch_size`` (over all ``world_size`` processes); the last partial batch
    kept or trimmed (module docstring)."""
    indices = [int(i) for i in order]
    batches = [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)]
    if batches:
        share = len(batches[-1]) // world_size
        if share > group_size > 1 and share % group_size:
            share -= share % group_size
        if share:
            batches[-1] = batches[-1][:share * world_size]
        else:  # fewer images than processes
            batches.pop()
    return batches


def rank_share(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Process ``rank``'s images of a step's ``batch`` (strided: the batch's first image goes to rank 0)."""
    return list(batch)[rank::world_size]
