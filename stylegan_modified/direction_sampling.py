"""Sampling for the attribute directions: for images 0..n-1, their w and their 7 property scores.

Image *i* uses z_i drawn from an RNG seeded by (seed, i) (the same z as stage 1's image *i* for the same
seed), w_i = mapping(z_i), the image synthesised from w_i on every layer (stored noise, no truncation) and
scored by a scorer (the property CNN: images -> [N, 7] in the standard order). Generator and scorer are
batched; only w and the scores are kept (80,000 samples of a 512-wide w are 160 MB, no images) unless
``save_images`` asks for the JPEGs too.

Samples are written in chunks of ``chunk_size`` images, each atomically, so an interrupted run loses at
most one chunk and a rerun computes only the missing ones. Batches start at chunk boundaries, so a
resumed run computes every chunk exactly as an uninterrupted one (bit for bit on CPU at the same batch
size). The folder's ``samples_settings.json`` records what decides the numbers (the base generator's and
the scorer's SHA-256, the seed, the widths, the chunk size); a run with other settings is refused in one
line instead of mixing two populations.

A split run (``--shard i/n`` or torchrun) computes the chunks k with k mod n = i; each shard records its settings
in its shard record, and :func:`merge_shards` writes ``samples_settings.json`` once every chunk is there, so the
folder holds exactly what one process writes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ohlora import atomic
from ohlora.amp import autocast
from ohlora.constants import PROPERTY_NAMES
from ohlora.distributed import Shard
from ohlora.errors import PipelineError
from ohlora.image_writer import BatchImageWriter
from ohlora.layout import DirectionSamplesFolder
from ohlora.records import differences, read_record, sha256_of
from ohlora.sharding import ShardRecords, merge_command
from stylegan.postprocess import to_uint8
from stylegan.sampling import Z_STREAM, sampled_latent
from stylegan_modified.delivered_images import CNN_INPUT, ENCODING, cnn_input, delivered
from stylegan_modified.w_space import WGenerator, broadcast_w

logger = logging.getLogger(__name__)

CHUNK_FORMAT = 'ohlora-direction-samples-chunk'
DEFAULT_MERGE_COMMAND = merge_command('directions')  # the messages' merge command when a caller names none
NUM_SCORES = len(PROPERTY_NAMES)  # the property CNN's outputs, in the standard order
Z_RULE = f'z_i = randn(z_dim) from item_generator(seed, i, stream {Z_STREAM}) (stage 1\'s z of image i)'
SCORE_INPUT = f'{ENCODING}; {CNN_INPUT}'  # what PropertyCNNScorer scores

Scorer = Callable[[torch.Tensor], torch.Tensor]


def file_identity(path: str | Path) -> dict:
    """What identifies a weights file in records: its name, size and SHA-256 (the content decides, not the name)."""
    path = Path(path)
    return {'file': path.name, 'bytes': path.stat().st_size, 'sha256': sha256_of(path)}


class PropertyCNNScorer:
    """The property-score CNN as a scorer: raw generator images (about [-1, 1]) -> [N, 7], eval mode.

    The images are scored as the evaluation measures them (:mod:`stylegan_modified.delivered_images`): GenForce's
    uint8 conversion, OpenCV's JPEG and back, ``uint8 / 127.5 - 1``; so the directions' absolute targets are
    those of the delivered images, and the evaluation's MAE is not inflated by the format difference.
    """

    def __init__(self, cnn: torch.nn.Module):
        self.cnn = cnn.eval()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(images).all()):  # the uint8 conversion would hide them as black images
            raise PipelineError('the base generator gave NaN or infinite pixels; its weights are broken')
        device = next(self.cnn.parameters()).device
        return self.cnn(cnn_input(delivered(images), device))


@dataclass(frozen=True)
class SampleSettings:
    """Everything that decides the numbers of a sample; a resumed run must use the same."""
    generator: dict            # identity of the base generator (kind, file, bytes, sha256, label, ...)
    scorer: dict               # identity of the scorer (file, bytes, sha256 of the property CNN)
    seed: int
    z_dim: int
    w_dim: int
    num_layers: int
    chunk_size: int
    z_rule: str = Z_RULE
    score_input: str = SCORE_INPUT
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        # a JSON round trip, so that tuples compare equal to the lists read back from the record
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode('utf-8')).hexdigest()


@dataclass
class SampleSet:
    """w [n, w_dim] and scores [n, 7] (float32, CPU) of images 0..n-1; how many were computed now or reused."""
    w: torch.Tensor
    scores: torch.Tensor
    settings: SampleSettings
    computed: int = 0
    reused: int = 0

    @property
    def num(self) -> int:
        return int(self.w.shape[0])


def chunk_plan(num: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """(chunk index, first image, image count) covering images 0..num-1."""
    return [(k, k * chunk_size, min(chunk_size, num - k * chunk_size)) for k in range(math.ceil(num / chunk_size))]


def check_settings(files: DirectionSamplesFolder, settings: SampleSettings, vouched_by_shards: bool = False) -> bool:
    """True when the folder already records ``settings``; a folder of other settings is refused in one line.
    ``vouched_by_shards``: without a record, the shard records of a split run (checked to hold these settings)
    say how the chunks were made."""
    recorded = read_record(files.settings_json, 'samples record of the directions tool',
                           f'delete the folder {files.folder} or choose another --samples-dir')
    chunks = files.chunk_files()
    if recorded is None:
        if chunks and not vouched_by_shards:
            raise PipelineError(f'{files.folder} holds {len(chunks)} sample chunks but no {files.settings_json.name} '
                                'says how they were made; delete them or choose another --samples-dir')
        return False
    changed = differences(recorded, settings.as_json())
    if not changed:
        return True
    raise PipelineError(f'{files.folder} holds samples made with other settings ({", ".join(changed[:3])}); rerun '
                        'with the same generator, property CNN and seed, or choose another --samples-dir')


def _load_chunk(path: Path, digest: str, start: int, count: int, w_dim: int) -> dict | None:
    """The chunk's w and scores if it is a complete chunk of these settings covering the images; else None."""
    if not path.is_file():
        return None
    try:
        chunk = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # atomic writes make this rare (a disk error); recomputing is always safe
        logger.warning('%s is unreadable (%s); computing it again', path, type(exc).__name__)
        return None
    ok = (isinstance(chunk, dict) and chunk.get('format') == CHUNK_FORMAT and chunk.get('settings_sha256') == digest
          and chunk.get('start') == start and isinstance(chunk.get('w'), torch.Tensor)
          and isinstance(chunk.get('scores'), torch.Tensor))
    if not ok:
        logger.warning('%s is not a sample chunk of these settings; computing it again', path)
        return None
    w, scores = chunk['w'], chunk['scores']
    if w.ndim != 2 or w.shape[1] != w_dim or tuple(scores.shape) != (w.shape[0], NUM_SCORES) or w.shape[0] < count:
        return None  # a shorter chunk (a smaller --num before): computed again, fully
    return {'w': w[:count], 'scores': scores[:count]}


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = atomic.temporary_name(folder / 'probe')  # this process's own: shards probe the folder at once
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as exc:
        raise PipelineError(f'cannot write into {folder}: {exc.strerror or exc}') from None


def _check_scores(scores: torch.Tensor, rows: int) -> torch.Tensor:
    if tuple(scores.shape) != (rows, NUM_SCORES):
        raise PipelineError(f'the scorer returned scores of shape {list(scores.shape)}, expected [{rows}, {NUM_SCORES}]')
    if not bool(torch.isfinite(scores).all()):
        raise PipelineError('the property CNN gave NaN or infinite scores; its weights or the generator\'s are broken')
    return scores


def compute_chunk(w_generator: WGenerator, scorer: Scorer, seed: int, start: int, count: int, batch_size: int,
                  image_paths: Callable[[int], Path] | None = None, bar=None,
                  amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [count, w_dim] and scores [count, 7] of images start..start+count-1, in batches from ``start``;
    ``amp``: the synthesis and the scorer under bfloat16 autocast (w stays float32, the scores are kept so)."""
    ws, scores = [], []
    with BatchImageWriter() as writer:  # JPEGs written while the next batch renders; all done when it returns
        for offset in range(0, count, batch_size):
            numbers = range(start + offset, start + min(offset + batch_size, count))
            z = torch.stack([sampled_latent(seed, n, w_generator.z_dim) for n in numbers])
            with torch.inference_mode():
                w = w_generator.w(z)  # float32 under --amp too: w is what the fit is made of
                with autocast(w_generator.device, amp):
                    images = w_generator.images(broadcast_w(w, w_generator.num_layers)).float()
                    batch_scores = _check_scores(scorer(images).float(), len(numbers))
            if image_paths is not None:
                writer.submit([(image_paths(n), np.ascontiguousarray(rgb[:, :, ::-1]))
                               for n, rgb in zip(numbers, to_uint8(images))])
            ws.append(w.detach().to('cpu', torch.float32))
            scores.append(batch_scores.detach().to('cpu', torch.float32))
            if bar is not None:
                bar.update(len(numbers))
    return torch.cat(ws), torch.cat(scores)


def shard_records(files: DirectionSamplesFolder, merge_command: str = DEFAULT_MERGE_COMMAND) \
        -> ShardRecords:
    return ShardRecords(files.shard_records, merge_command)


def sample_w_and_scores(w_generator: WGenerator, scorer: Scorer, files: DirectionSamplesFolder,
                        settings: SampleSettings, num: int, batch_size: int, save_images: bool = False,
                        progress: bool = True, shard: Shard | None = None,
                        merge_command: str = DEFAULT_MERGE_COMMAND) -> SampleSet:
    """w and scores of images 0..num-1: chunks already in ``files`` are reused, the others computed and written.

    With ``shard``, only its chunks (k mod n = i) and its shard record instead of ``samples_settings.json``; the
    SampleSet then holds the shard's chunks only (the fit waits for the merge, :func:`merge_shards`)."""
    if num < 1:
        raise PipelineError(f'--num must be at least 1, got {num}')
    if batch_size < 1 or settings.chunk_size < 1:
        raise PipelineError('the batch size and the chunk size must be at least 1')
    if (w_generator.z_dim, w_generator.w_dim, w_generator.num_layers) != \
            (settings.z_dim, settings.w_dim, settings.num_layers):
        raise ValueError('the settings do not describe this generator (z, w widths or layers differ)')
    shard = shard or Shard()
    records, key = shard_records(files, merge_command), _shard_key(settings, num, save_images, batch_size)
    if shard.whole:
        records.refuse_unmerged()
    else:
        records.check_start(shard, key)
    recorded = check_settings(files, settings, vouched_by_shards=not shard.whole and records.exist())
    digest = settings.digest()
    plan = [item for item in chunk_plan(num, settings.chunk_size) if shard.whole or shard.owns(item[0])]

    parts: dict[int, dict] = {}
    for index, start, count in plan:
        chunk = _load_chunk(files.chunk(index), digest, start, count, settings.w_dim)
        images_there = not save_images or all(files.image(n).is_file() for n in range(start, start + count))
        if chunk is not None and images_there:
            parts[index] = chunk
    todo = [item for item in plan if item[0] not in parts]
    reused = sum(count for index, _, count in plan if index in parts)
    if todo or not shard.whole:
        _ensure_writable(files.folder)
        if not shard.whole:
            records.write(shard, key, finished=False)
        elif not recorded:
            atomic.write_json(files.settings_json, settings.as_json())
    amp = 'amp' in settings.extra
    bar = tqdm(total=sum(c for _, _, c in todo), desc='sampling w + scores', unit='img', disable=not progress)
    for index, start, count in todo:
        w, scores = compute_chunk(w_generator, scorer, settings.seed, start, count, batch_size,
                                  files.image if save_images else None, bar, amp=amp)
        # written last: a chunk on disk means its images (if asked) are there too
        atomic.torch_save(files.chunk(index), {'format': CHUNK_FORMAT, 'settings_sha256': digest, 'start': start,
                                               'count': count, 'w': w, 'scores': scores})
        parts[index] = {'w': w, 'scores': scores}
    bar.close()
    if not shard.whole:
        records.write(shard, key, finished=True, computed=sum(c for _, _, c in todo))
    ordered = [parts[index] for index, _, _ in plan]
    total = sum(count for _, _, count in plan)
    if not ordered:  # a shard without chunks (fewer chunks than shards)
        return SampleSet(w=torch.zeros(0, settings.w_dim), scores=torch.zeros(0, NUM_SCORES), settings=settings)
    return SampleSet(w=torch.cat([p['w'] for p in ordered]), scores=torch.cat([p['scores'] for p in ordered]),
                     settings=settings, computed=total - reused, reused=reused)


def _shard_key(settings: SampleSettings, num: int, save_images: bool, batch_size: int) -> dict:
    """What every shard of a split sampling must share (the settings and the batches a chunk is rendered in decide
    the numbers; num and --save-images what the folder holds once merged)."""
    return {'settings': settings.as_json(), 'num': num, 'save_images': save_images, 'batch_size': batch_size}


def merge_shards(files: DirectionSamplesFolder, merge_command: str = DEFAULT_MERGE_COMMAND) \
        -> tuple[int, int]:
    """``samples_settings.json`` of a split sampling, as one process writes it, once every chunk of its finished
    shards is there (their records are then removed); returns (samples, shards)."""
    records = shard_records(files, merge_command)
    shards = records.collect()
    key = shards[0]['key']
    settings = SampleSettings(**key['settings'])
    recorded = check_settings(files, settings, vouched_by_shards=True)
    digest, count = settings.digest(), len(shards)
    for index, start, size in chunk_plan(key['num'], settings.chunk_size):
        there = _load_chunk(files.chunk(index), digest, start, size, settings.w_dim) is not None
        if there and key['save_images']:
            there = all(files.image(n).is_file() for n in range(start, start + size))
        if not there:
            raise PipelineError(f'{files.chunk(index)} is missing or not a chunk of these settings, although every '
                                f'shard finished; rerun shard {index % count}/{count}, then merge')
    if not recorded:
        atomic.write_json(files.settings_json, settings.as_json())
    records.remove()
    return key['num'], count
