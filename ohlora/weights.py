"""Where every weights file comes from, and the one downloader of the project.

Each :class:`WeightSource` names a published file (a Hugging Face repo + file, or a plain URL), its expected
size / SHA-256 where known, and where the pipeline keeps it (a :class:`~ohlora.layout.Layout` path).
:func:`fetch` returns a usable local path: the ``--weights`` override, else the cached file, else a fresh
download (progress bar, atomic write, checksum). Offline it fails with one line naming the file, its source
and ``--weights``.

Set ``OHLORA_NO_DOWNLOAD=1`` to forbid downloads (the test suite does); missing files then fail at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ohlora.errors import PipelineError, WeightsUnavailable, first_line
from ohlora.layout import Layout

OHLORA_CNN_REPO = 'daebakgazua/250408_OhLoRA_CNNs'
OHLORA_FINE_TUNED_REPO = 'daebakgazua/250408_OhLoRA_StyleGAN_FineTuned'
OHLORA_ALL_IMAGES_DATASET = 'daebakgazua/250408_OhLoRA_all_generated_images'
OHLORA_FILTERED_IMAGES_DATASET = 'daebakgazua/250408_OhLoRA_filtered_images'
FACEXFORMER_REPO = 'kartiknarayan/facexformer'
FACENET_VGGFACE2_URL = ('https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/'
                        '20180402-114759-vggface2.pt')
GENFORCE_ZOO_URL = ('https://mycuhk-my.sharepoint.com/:u:/g/personal/1155082926_link_cuhk_edu_hk/'
                    'ET2etKNzMS9JmHj5j60fqMcBRJfQfYNvqUrujaIXxCvKDQ?e=QReLE6&download=1')


@dataclass(frozen=True)
class WeightSource:
    description: str                       # what the file is, for messages
    destination: Callable[[Layout], Path]  # where the pipeline keeps it
    hf_repo: str | None = None             # Hugging Face repo id ...
    hf_file: str | None = None             # ... and file inside it
    url: str | None = None                 # or a plain URL
    sha256: str | None = None
    size: int | None = None
    note: str = ''                         # appended to the offline message

    @property
    def origin(self) -> str:
        if self.hf_repo:
            return f'https://huggingface.co/{self.hf_repo} (file {self.hf_file})'
        return self.url or 'nowhere known'


def _fine_tuned(name: str, description: str) -> WeightSource:
    return WeightSource(description, lambda layout: layout.fine_tuned(name), OHLORA_FINE_TUNED_REPO, name)


def _cnn(prop: str, fold: int) -> WeightSource:
    return WeightSource(f'Oh-LoRA {prop} CNN, fold {fold}', lambda layout: layout.cnn_model(prop, fold),
                        OHLORA_CNN_REPO, f'{prop}_model_{fold}.pt')


SOURCES: dict[str, WeightSource] = {
    'genforce_stylegan256': WeightSource(
        'GenForce StyleGAN celeba_partial-256x256 (stylegan_celeba_partial256.pth)',
        lambda layout: layout.original_generator_weights, url=GENFORCE_ZOO_URL,
        note='the GenForce zoo link is reported dead for some users (genforce/genforce#44); '
             'if it fails, get stylegan_celeba_partial256.pth elsewhere'),
    'facexformer': WeightSource(
        'FaceXFormer checkpoint ckpts/model.pt (about 1.1 GB)',
        lambda layout: layout.facexformer_weights, FACEXFORMER_REPO, 'ckpts/model.pt'),
    'v1_generator': _fine_tuned('stylegan_gen_fine_tuned_v1.pth', 'Oh-LoRA fine-tuned StyleGAN v1 generator'),
    'v1_discriminator': _fine_tuned('stylegan_dis_fine_tuned_v1.pth', 'Oh-LoRA fine-tuned StyleGAN v1 discriminator'),
    'v2_property_cnn': _fine_tuned('stylegan_gen_fine_tuned_v2_cnn.pth', 'Oh-LoRA v2 property-score CNN'),
    'v3_generator': _fine_tuned('stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth',
                                'Oh-LoRA fine-tuned StyleGAN v3 generator (epoch 5)'),
    'v4_generator': _fine_tuned('stylegan_gen_fine_tuned_v4.pth', 'Oh-LoRA fine-tuned StyleGAN v4 generator'),
    'v4_discriminator': _fine_tuned('stylegan_dis_fine_tuned_v4.pth', 'Oh-LoRA fine-tuned StyleGAN v4 discriminator'),
    **{f'{prop}_model_{fold}': _cnn(prop, fold) for prop in ('gender', 'quality') for fold in range(5)},
    'facenet_vggface2': WeightSource(
        'facenet-pytorch InceptionResnetV1 VGGFace2 weights (20180402-114759-vggface2.pt, about 107 MB)',
        lambda layout: layout.identity_weights, url=FACENET_VGGFACE2_URL),
}


def downloads_allowed() -> bool:
    return os.environ.get('OHLORA_NO_DOWNLOAD', '') in ('', '0')


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_integrity(source: WeightSource, path: Path) -> None:
    if source.size is not None and path.stat().st_size != source.size:
        raise PipelineError(f'{path} has {path.stat().st_size} bytes, but the {source.description} has '
                            f'{source.size}; delete it to download it again, or pass --weights PATH')
    if source.sha256 is not None and sha256_of(path) != source.sha256:
        raise PipelineError(f'{path} does not have the SHA-256 of the {source.description}; '
                            'delete it to download it again, or pass --weights PATH')


def _unavailable(source: WeightSource, dest: Path, reason: str) -> WeightsUnavailable:
    note = f'; {source.note}' if source.note else ''
    return WeightsUnavailable(f'{source.description} is missing: {dest} does not exist and it could not be '
                              f'downloaded from {source.origin} ({reason}){note}; download it by hand to '
                              f'that path or pass --weights PATH')


def _download(source: WeightSource, dest: Path) -> None:
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix='.tmp-download-', dir=dest.parent))
    succeeded = False
    try:
        if source.hf_repo:
            from huggingface_hub import hf_hub_download

            fetched = Path(hf_hub_download(source.hf_repo, source.hf_file, local_dir=staging))
        else:
            from torch.hub import download_url_to_file

            fetched = staging / dest.name
            download_url_to_file(source.url, str(fetched), progress=True)
        _check_integrity(source, fetched)
        os.replace(fetched, dest)
        succeeded = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not succeeded:  # a failed download leaves no empty folders behind
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()


def fetch(key: str, layout: Layout, override: str | Path | None = None) -> Path:
    """A local path to the weights ``key`` of :data:`SOURCES`: the override, the cached copy or a download."""
    source = SOURCES[key]
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise PipelineError(f'--weights {path}: no such file (expected the {source.description})')
        return path
    dest = source.destination(layout)
    if dest.is_file():
        return dest
    if not downloads_allowed():
        raise _unavailable(source, dest, 'downloads are switched off by OHLORA_NO_DOWNLOAD')
    try:
        _download(source, dest)
    except PipelineError:
        raise
    except Exception as exc:  # network, HTTP, hub errors: all mean "not available", said in one line
        reason = first_line(exc)
        raise _unavailable(source, dest, f'{type(exc).__name__}: {reason}') from None
    return dest


def fetch_dataset_images(repo_id: str, dest_dir: Path, description: str) -> Path:
    """Download the ``*.jpg`` files of a Hugging Face dataset into a staging folder beside ``dest_dir``.

    Returns the staging folder; the caller moves the files into place and removes it. The hub skips files
    it already has there, so an interrupted import resumes.
    """
    origin = f'https://huggingface.co/datasets/{repo_id}'
    if not downloads_allowed():
        raise WeightsUnavailable(f'{description} could not be downloaded from {origin} '
                                 '(downloads are switched off by OHLORA_NO_DOWNLOAD)')
    staging = dest_dir.parent / f'.tmp-download-{dest_dir.name}'
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, repo_type='dataset', local_dir=staging, allow_patterns=['*.jpg'])
    except Exception as exc:
        reason = first_line(exc)
        raise WeightsUnavailable(f'{description} could not be downloaded from {origin} '
                                 f'({type(exc).__name__}: {reason}); download the .jpg files by hand '
                                 f'into {dest_dir}') from None
    return staging
