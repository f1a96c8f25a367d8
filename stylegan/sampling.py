"""Stage 1: sample images from the pretrained GenForce StyleGAN, seeded per image, resumable.

Image *i* depends only on (seed, i): its z, its optional style-mixing draws and nothing else, so the batch
size, the device order and resuming change nothing but float rounding (R1).

``synthesize_results_meta.json`` records the recipe the images were made with, the generator identified by the
SHA-256 of its weights file (not by its name or size: every fine-tune of one architecture has the same size).
A rerun with the same recipe adds the missing images; another recipe is refused instead of mixing two
generators' images in one folder.

A split run (``--shard i/n`` or torchrun) renders the whole batches k with k mod n = i, so every image comes out
of the batch one process renders it in (byte-identical files); each shard records its recipe in its shard
record, and :func:`merge_shards` writes the meta and the z record one process writes.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ohlora import atomic
from ohlora.amp import autocast
from ohlora.devices import item_generator
from ohlora.distributed import Shard
from ohlora.errors import PipelineError
from ohlora.image_writer import BatchImageWriter
from ohlora.layout import IMAGE_PATTERN, PUBLISHED_IMAGES_GLOB, Layout, image_name, parse_img_no
from ohlora.records import (aligned_batches, read_record, refuse_other_settings, scan_outputs, write_record,
                            write_z_record)
from ohlora.sharding import ShardRecords, merge_command
from stylegan.postprocess import require_finite, to_uint8

# Streams of item_generator: one independent RNG per purpose and image.
Z_STREAM, MIX_DECISION_STREAM, MIX_Z_STREAM = 0, 1, 2
SAMPLED, PUBLISHED = 'sampled', 'published'


@dataclass(frozen=True)
class SamplingRecipe:
    """Everything that decides the pixels of image *i*; a resumed run must use the same recipe."""
    seed: int
    weights_sha256: str
    generator_key: str
    trunc_psi: float
    trunc_layers: int
    style_mixing_prob: float
    z_dim: int
    num_layers: int
    amp: str | None = None  # --amp: the autocast dtype; None (float32) is left out of the record

    def as_json(self) -> dict:
        """The recipe as the meta records it (a float32 recipe's record is what it was before --amp existed)."""
        record = asdict(self)
        if record['amp'] is None:
            del record['amp']
        return record


def sampled_latent(seed: int, img_no: int, z_dim: int, stream: int = Z_STREAM) -> torch.Tensor:
    """The N(0, I) z of image ``img_no``, drawn from (seed, img_no) alone."""
    return torch.randn(z_dim, generator=item_generator(seed, img_no, stream))


def mixing_cutoff(recipe: SamplingRecipe, img_no: int) -> int | None:
    """The upstream train-mode style mixing, drawn per image: cutoff in [1, num_layers) with the given probability."""
    if recipe.style_mixing_prob <= 0:
        return None
    gen = item_generator(recipe.seed, img_no, MIX_DECISION_STREAM)
    if torch.rand((), generator=gen).item() >= recipe.style_mixing_prob:
        return None
    return int(torch.randint(1, recipe.num_layers, (), generator=gen).item())


@torch.no_grad()
def render_sampled(generator, z: torch.Tensor, recipe: SamplingRecipe, img_nos: list[int]) -> np.ndarray:
    """uint8 NHWC RGB images for a batch of latents, with per-image mixing when the recipe asks for it."""
    device = next(generator.parameters()).device
    z = z.to(device)
    wp = generator.truncation(generator.mapping(z)['w'])  # psi 1 here: only repeats w over the layers
    cutoffs = [mixing_cutoff(recipe, n) for n in img_nos]
    if any(c is not None for c in cutoffs):
        mix_z = torch.stack([sampled_latent(recipe.seed, n, recipe.z_dim, MIX_Z_STREAM) for n in img_nos]).to(device)
        mix_wp = generator.truncation(generator.mapping(mix_z)['w'])
        for row, cutoff in enumerate(cutoffs):
            if cutoff is not None:
                wp[row, cutoff:] = mix_wp[row, cutoff:]
    wp = generator.truncation(wp, trunc_psi=recipe.trunc_psi, trunc_layers=recipe.trunc_layers)
    # --amp: the synthesis network only; the mapping network costs little and in bfloat16 it adds a third of the
    # images' rounding error (measured on the zoo widths).
    with autocast(device, recipe.amp is not None):
        image = generator.synthesis(wp, randomize_noise=False)['image'].float()
    require_finite(image, img_nos, 'check the weights file and --trunc-psi')
    return to_uint8(image)


def existing_images(folder: Path) -> set[int]:
    """Image numbers already written (regular ``NNNNNN.jpg`` files); any other name in the folder is an error."""
    scan = scan_outputs(folder, IMAGE_PATTERN, 'a stage-1 image')
    if scan.others:
        raise PipelineError(f'{folder} holds files that are not stage-1 images ({", ".join(scan.others[:3])}); '
                            'move them away or choose another --root')
    return set(scan.found.values())


def check_outputs(layout: Layout) -> None:
    """The stage-1 folders can be written and no folder sits where a record goes (before anything runs)."""
    atomic.check_writable(layout.synthesized_dir, layout.synthesized_meta.parent)
    atomic.check_replaceable(layout.synthesized_meta, layout.synthesized_z_csv)


def read_meta(layout: Layout) -> dict | None:
    """The stage-1 record (how the images were made), None when there is none; one line when it is unusable."""
    return read_record(layout.synthesized_meta, 'stage-1 record',
                       'delete it only together with the images it describes, or choose another --root')


def image_source(layout: Layout) -> str | None:
    """'sampled', 'published' or None (no record): where the stage-1 images came from."""
    meta = read_meta(layout)
    return None if meta is None else meta.get('source')


def check_resumable(layout: Layout, recipe: SamplingRecipe, done: set[int], vouched_by_shards: bool = False) -> None:
    """Refuse to mix images of two recipes (or of unknown origin) in one folder. ``vouched_by_shards``: without a
    meta, the records of a split run (checked to hold this recipe) say how the images were made."""
    _check_meta(layout, recipe.as_json(), done, vouched_by_shards)


def _check_meta(layout: Layout, settings: dict, done: set[int], vouched_by_shards: bool = False) -> None:
    meta = read_meta(layout)
    if done and meta is not None and meta.get('source') == PUBLISHED:
        raise PipelineError(f'{layout.synthesized_dir} holds images imported with --published; '
                            'sample into another --root')
    if meta is None and vouched_by_shards:
        return
    refuse_other_settings(meta, settings, outputs=len(done), folder=layout.synthesized_dir,
                          record_path=layout.synthesized_meta, noun='images', remedy='use another --root')


def shard_records(layout: Layout) -> ShardRecords:
    return ShardRecords(layout.shard_records('1'), merge_command('1', layout.root))


def shard_key(recipe: SamplingRecipe, num: int, batch_size: int) -> dict:
    """What every shard of a split run must share: the recipe, the images and the batches they are split by."""
    return {'settings': recipe.as_json(), 'num': num, 'batch_size': batch_size}


def write_records(layout: Layout, settings: dict, img_nos: list[int], weights_file: str | None) -> None:
    """The meta and the z record of images ``img_nos`` (each written only if it changes)."""
    write_record(layout.synthesized_meta, settings, source=SAMPLED, weights_file=weights_file)
    write_z_record(layout.synthesized_z_csv, img_nos,
                   torch.stack([sampled_latent(settings['seed'], n, settings['z_dim']) for n in img_nos]).numpy())


def sample_images(generator, layout: Layout, recipe: SamplingRecipe, num: int, batch_size: int,
                  progress: bool = True, weights_file: str | None = None, shard: Shard | None = None) -> int:
    """Write images 0..num-1 that are not there yet (with ``shard``, those of its batches); returns how many were
    written. A shard writes its shard record instead of the meta and the z record (see :func:`merge_shards`)."""
    if num < 1:
        raise PipelineError(f'--num must be at least 1, got {num}')
    shard = shard or Shard()
    check_outputs(layout)
    folder = layout.synthesized_dir
    done = existing_images(folder)
    records, key = shard_records(layout), shard_key(recipe, num, batch_size)
    if shard.whole:
        records.refuse_unmerged()
    else:
        records.check_start(shard, key)
    check_resumable(layout, recipe, done, vouched_by_shards=not shard.whole and records.exist())
    batches = aligned_batches(list(range(num)), done, batch_size, None if shard.whole else shard)
    todo = [n for batch in batches for n in batch if n not in done]

    def record(finished: bool = False) -> None:  # after the first batch rendered: a refused batch changes nothing
        if shard.whole:
            write_records(layout, recipe.as_json(), sorted(done | set(range(num))), weights_file)
        else:
            records.write(shard, key, finished=finished, weights_file=weights_file)

    if not todo:
        record(finished=True)  # a finished rerun writes nothing (both records are written only if they change)
        return 0
    bar = tqdm(total=len(todo), desc='sampling', unit='img', disable=not progress)
    with BatchImageWriter(on_written=bar.update) as writer:  # JPEGs are written while the next batch renders
        for index, batch in enumerate(batches):
            z = torch.stack([sampled_latent(recipe.seed, n, recipe.z_dim) for n in batch])
            images = render_sampled(generator, z, recipe, batch)
            if index == 0:
                record()
            writer.submit((layout.synthesized_image(n), rgb[:, :, ::-1]) for n, rgb in zip(batch, images)
                          if n not in done)
    bar.close()
    if not shard.whole:
        record(finished=True)
    return len(todo)


def merge_shards(layout: Layout) -> tuple[int, int]:
    """The meta and the z record of a split run, exactly as one process writes them, from the records of its
    finished shards (then removed); returns (images, shards)."""
    records = shard_records(layout)
    shards = records.collect()
    key, weights_file = shards[0]['key'], shards[0].get('weights_file')
    settings, num, batch_size = key['settings'], key['num'], key['batch_size']
    check_outputs(layout)
    done = existing_images(layout.synthesized_dir)
    _check_meta(layout, settings, done, vouched_by_shards=True)  # an earlier meta must hold the same recipe
    missing = sorted(set(range(num)) - done)
    if missing:
        count = len(shards)
        raise PipelineError(f'{layout.synthesized_image(missing[0])} is missing, although every shard finished '
                            f'(deleted since?); rerun shard {(missing[0] // batch_size) % count}/{count}, then merge')
    write_records(layout, settings, sorted(done | set(range(num))), weights_file)
    records.remove()
    return num, len(shards)


def import_published(layout: Layout) -> int:
    """Stage-1 output from the published 10,000 images that the shipped hand labels describe."""
    from ohlora.weights import OHLORA_ALL_IMAGES_DATASET, fetch_dataset_images

    folder = layout.synthesized_dir
    check_outputs(layout)
    done = existing_images(folder)
    meta = read_meta(layout)
    if done and (meta is None or meta.get('source') != PUBLISHED):
        raise PipelineError(f'{folder} already holds sampled images; import the published set into another --root')
    staging = fetch_dataset_images(OHLORA_ALL_IMAGES_DATASET, folder, 'the published 10,000 Oh-LoRA images')
    folder.mkdir(parents=True, exist_ok=True)
    moved = 0
    for path in sorted(staging.rglob(PUBLISHED_IMAGES_GLOB)):
        number = parse_img_no(path.name)
        if number is not None and path.name == image_name(number) and number not in done:
            atomic.give_default_mode(path)  # the hub's files keep its temporaries' mode otherwise
            path.replace(layout.synthesized_image(number))
            moved += 1
    write_record(layout.synthesized_meta, {'dataset': OHLORA_ALL_IMAGES_DATASET}, source=PUBLISHED)
    shutil.rmtree(staging, ignore_errors=True)
    return moved
