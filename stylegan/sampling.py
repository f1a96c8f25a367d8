"""Stage 1: sample images from the pretrained GenForce StyleGAN, seeded per image, resumable.

Image *i* depends only on (seed, i): its z, its optional style-mixing draws and nothing else, so the batch
size, the device order and resuming change nothing but float rounding (R1).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ohlora import atomic
from ohlora.devices import item_generator
from ohlora.errors import PipelineError
from ohlora.layout import Layout, image_name, parse_img_no
from stylegan.postprocess import to_uint8

# Streams of item_generator: one independent RNG per purpose and image.
Z_STREAM, MIX_DECISION_STREAM, MIX_Z_STREAM = 0, 1, 2


@dataclass(frozen=True)
class SamplingRecipe:
    """Everything that decides the pixels of image *i*; a resumed run must use the same recipe."""
    seed: int
    weights_file: str
    weights_bytes: int
    generator_key: str
    trunc_psi: float
    trunc_layers: int
    style_mixing_prob: float
    z_dim: int
    num_layers: int


def image_latent(seed: int, img_no: int, z_dim: int, stream: int = Z_STREAM) -> torch.Tensor:
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
def synthesize(generator, z: torch.Tensor, recipe: SamplingRecipe, img_nos: list[int]) -> np.ndarray:
    """uint8 NHWC RGB images for a batch of latents, with per-image mixing when the recipe asks for it."""
    device = next(generator.parameters()).device
    z = z.to(device)
    wp = generator.truncation(generator.mapping(z)['w'])  # psi 1 here: only repeats w over the layers
    cutoffs = [mixing_cutoff(recipe, n) for n in img_nos]
    if any(c is not None for c in cutoffs):
        mix_z = torch.stack([image_latent(recipe.seed, n, recipe.z_dim, MIX_Z_STREAM) for n in img_nos]).to(device)
        mix_wp = generator.truncation(generator.mapping(mix_z)['w'])
        for row, cutoff in enumerate(cutoffs):
            if cutoff is not None:
                wp[row, cutoff:] = mix_wp[row, cutoff:]
    wp = generator.truncation(wp, trunc_psi=recipe.trunc_psi, trunc_layers=recipe.trunc_layers)
    image = generator.synthesis(wp, randomize_noise=False)['image']
    return to_uint8(image)


def existing_images(folder: Path) -> set[int]:
    """Image numbers already written; names that are not ``NNNNNN.jpg`` make the folder 'mixed', an error."""
    if not folder.is_dir():
        return set()
    found, foreign = set(), []
    for path in folder.iterdir():
        if path.name.startswith(atomic.TMP_PREFIX):
            continue
        number = parse_img_no(path.name)
        if number is None or path.suffix != '.jpg' or path.name != image_name(number):
            foreign.append(path.name)
        else:
            found.add(number)
    if foreign:
        raise PipelineError(f'{folder} holds files that are not stage-1 images ({", ".join(sorted(foreign)[:3])}); '
                            'move them away or choose another --root')
    return found


def read_meta(layout: Layout) -> dict | None:
    path = layout.synthesized_meta
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f'{path} is not valid JSON; delete it only together with the images it describes') from None


def check_resumable(layout: Layout, recipe: SamplingRecipe, done: set[int]) -> None:
    """Refuse to mix images of two recipes (or of unknown origin) in one folder."""
    meta = read_meta(layout)
    if not done and meta is None:
        return
    if meta is None:
        raise PipelineError(f'{layout.synthesized_dir} already holds {len(done)} images but no '
                            f'{layout.synthesized_meta.name} says how they were made; use another --root')
    if meta.get('source') != 'sampled':
        raise PipelineError(f'{layout.synthesized_dir} holds images imported with --published; '
                            'sample into another --root')
    previous = meta.get('recipe', {})
    changed = [k for k, v in asdict(recipe).items() if previous.get(k) != v]
    if done and changed:
        detail = ', '.join(f'{k} {previous.get(k)!r} -> {getattr(recipe, k)!r}' for k in changed[:3])
        raise PipelineError(f'{layout.synthesized_dir} holds images made with other settings ({detail}); '
                            'use the same settings to resume, or another --root')


def read_z_record(path: Path, z_dim: int) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    expected = ['img_no'] + [f'z{k}' for k in range(z_dim)]
    if list(frame.columns) != expected:
        raise PipelineError(f'{path} does not have the columns img_no,z0..z{z_dim - 1}; '
                            'it belongs to another run, use another --root')
    return frame


def write_z_record(layout: Layout, recipe: SamplingRecipe, num: int, fresh: bool) -> None:
    """Record the z of images 0..num-1 (merged with the rows already there unless ``fresh``), atomically."""
    path = layout.synthesized_z_csv
    previous = None if fresh else read_z_record(path, recipe.z_dim)
    if previous is not None and previous['img_no'].max() >= num - 1:
        return
    start = 0 if previous is None else int(previous['img_no'].max()) + 1
    z = torch.stack([image_latent(recipe.seed, n, recipe.z_dim) for n in range(start, num)]).numpy()
    frame = pd.DataFrame(z, columns=[f'z{k}' for k in range(recipe.z_dim)])
    frame.insert(0, 'img_no', np.arange(start, num))
    if previous is not None:
        frame = pd.concat([previous, frame], ignore_index=True)
    atomic.write_csv(path, frame)


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=atomic.TMP_PREFIX, dir=folder):
            pass
    except OSError as exc:
        raise PipelineError(f'cannot write into {folder}: {exc.strerror or exc}') from None


def sample_images(generator, layout: Layout, recipe: SamplingRecipe, num: int, batch_size: int,
                  progress: bool = True) -> int:
    """Write images 0..num-1 that are not there yet; returns how many were written."""
    if num < 1:
        raise PipelineError(f'--num must be at least 1, got {num}')
    folder = layout.synthesized_dir
    done = existing_images(folder)
    check_resumable(layout, recipe, done)
    meta = {'source': 'sampled', 'recipe': asdict(recipe)}
    same_recipe = read_meta(layout) == meta
    todo = [n for n in range(num) if n not in done]
    if not todo and same_recipe and layout.synthesized_z_csv.is_file():  # a finished rerun writes nothing
        return 0
    ensure_writable(folder)
    if not same_recipe:
        atomic.write_json(layout.synthesized_meta, meta)
    write_z_record(layout, recipe, num, fresh=not same_recipe)

    bar = tqdm(total=len(todo), desc='sampling', unit='img', disable=not progress)
    # Encoding JPEGs releases the GIL, so a few threads overlap it with the next batch's forward pass.
    with ThreadPoolExecutor(max_workers=4) as pool:
        pending = []
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            z = torch.stack([image_latent(recipe.seed, n, recipe.z_dim) for n in batch])
            images = synthesize(generator, z, recipe, batch)
            for n, rgb in zip(batch, images):
                pending.append(pool.submit(atomic.write_image, layout.synthesized_image(n), rgb[:, :, ::-1]))
            for future in pending:
                future.result()
            pending.clear()
            bar.update(len(batch))
    bar.close()
    return len(todo)


def import_published(layout: Layout) -> int:
    """Stage-1 output from the published 10,000 images that the shipped hand labels describe."""
    from ohlora.weights import OHLORA_ALL_IMAGES_DATASET, fetch_dataset_images

    folder = layout.synthesized_dir
    done = existing_images(folder)
    meta = read_meta(layout)
    if done and (meta is None or meta.get('source') != 'published'):
        raise PipelineError(f'{folder} already holds sampled images; import the published set into another --root')
    ensure_writable(folder)
    staging = fetch_dataset_images(OHLORA_ALL_IMAGES_DATASET, folder, 'the published 10,000 Oh-LoRA images')
    moved = 0
    for path in sorted(staging.rglob('*.jpg')):
        number = parse_img_no(path.name)
        if number is not None and path.name == image_name(number) and number not in done:
            path.replace(layout.synthesized_image(number))
            moved += 1
    atomic.write_json(layout.synthesized_meta, {'source': 'published', 'dataset': OHLORA_ALL_IMAGES_DATASET})
    shutil.rmtree(staging, ignore_errors=True)
    return moved
