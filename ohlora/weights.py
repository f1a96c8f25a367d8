"""Where every weights file comes from, and the one downloader of the project.

Each :class:`WeightSource` names a published file (a Hugging Face repo + file, or a plain URL), its published
size / SHA-256 where known, and where the pipeline keeps it (a :class:`~ohlora.layout.Layout` path).
:func:`fetch` returns a usable local path: the ``--weights`` override, else the cached file, else a fresh
download (progress bar, atomic move into place).

Integrity: no publisher states a size or SHA-256 for any of these files today, so none is pinned
(``WeightSource.size`` / ``sha256`` are None) and a first download cannot be verified against the publisher.
What is checked is that the file stays what was downloaded: each download records its size and SHA-256 beside
it (``Layout.download_record``), and every later use compares them, so a truncated or replaced file is caught
in one line. Files put in place by hand, and ``--weights`` files, have no such record and are used as they are.

Offline, one short connection attempt decides (no retries); the error is one line naming the file, its source
and the ``--weights`` option. Set ``OHLORA_NO_DOWNLOAD=1`` to forbid downloads (the test suite does).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from ohlora import atomic
from ohlora.constants import CNN_PROPERTIES, NUM_FOLDS
from ohlora.errors import PipelineError, WeightsUnavailable, first_line
from ohlora.layout import (DISCRIMINATOR_FILES, FACEXFORMER_HUB_FILE, GENERATOR_FILES, GENFORCE_ZOO_FILE,
                           IDENTITY_WEIGHTS_FILE, PROPERTY_CNN_FILE, PUBLISHED_IMAGES_GLOB, Layout, cnn_model_name)
from ohlora.records import read_record, weights_digest

OHLORA_CNN_REPO = 'daebakgazua/250408_OhLoRA_CNNs'
OHLORA_FINE_TUNED_REPO = 'daebakgazua/250408_OhLoRA_StyleGAN_FineTuned'
OHLORA_ALL_IMAGES_DATASET = 'daebakgazua/250408_OhLoRA_all_generated_images'
OHLORA_FILTERED_IMAGES_DATASET = 'daebakgazua/250408_OhLoRA_filtered_images'
FACEXFORMER_REPO = 'kartiknarayan/facexformer'
FACENET_VGGFACE2_URL = 'https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/' + IDENTITY_WEIGHTS_FILE
GENFORCE_ZOO_URL = ('https://mycuhk-my.sharepoint.com/:u:/g/personal/1155082926_link_cuhk_edu_hk/'
                    'ET2etKNzMS9JmHj5j60fqMcBRJfQfYNvqUrujaIXxCvKDQ?e=QReLE6&download=1')


@dataclass(frozen=True)
class WeightSource:
    description: str                       # what the file is, for messages
    destination: Callable[[Layout], Path]  # where the pipeline keeps it
    hf_repo: str | None = None             # Hugging Face repo id ...
    hf_file: str | None = None             # ... and file inside it
    url: str | None = None                 # or a plain URL
    sha256: str | None = None              # published checksum: none is known today
    size: int | None = None                # published size: none is known today
    note: str = ''                         # appended to the offline message
    option: str = '--weights PATH'         # how a script takes the file instead (for messages)

    @property
    def origin(self) -> str:
        if self.hf_repo:
            return f'https://huggingface.co/{self.hf_repo} (file {self.hf_file})'
        return self.url or 'nowhere known'


def _fine_tuned(name: str, description: str) -> WeightSource:
    return WeightSource(description, lambda layout: layout.fine_tuned(name), OHLORA_FINE_TUNED_REPO, name)


def cnn_key(prop: str, fold: int) -> str:
    """The :data:`SOURCES` key of a stage-2 fold model: its file name's stem, e.g. ``gender_model_0``."""
    return Path(cnn_model_name(prop, fold)).stem


def _cnn(prop: str, fold: int) -> WeightSource:
    return WeightSource(f'Oh-LoRA {prop} CNN, fold {fold}', lambda layout: layout.cnn_model(prop, fold),
                        OHLORA_CNN_REPO, cnn_model_name(prop, fold),
                        option='--weights DIR (a folder holding all ten fold files)')


SOURCES: dict[str, WeightSource] = {
    'genforce_stylegan256': WeightSource(
        f'GenForce StyleGAN celeba_partial-256x256 ({GENFORCE_ZOO_FILE})',
        lambda layout: layout.original_generator_weights, url=GENFORCE_ZOO_URL,
        note='the GenForce zoo link is reported dead for some users (genforce/genforce#44); '
             f'if it fails, get {GENFORCE_ZOO_FILE} elsewhere'),
    'facexformer': WeightSource(
        f'FaceXFormer checkpoint {FACEXFORMER_HUB_FILE} (about 1.1 GB)',
        lambda layout: layout.facexformer_weights, FACEXFORMER_REPO, FACEXFORMER_HUB_FILE),
    'v1_generator': _fine_tuned(GENERATOR_FILES['v1'], 'Oh-LoRA fine-tuned StyleGAN v1 generator'),
    'v1_discriminator': _fine_tuned(DISCRIMINATOR_FILES['v1'], 'Oh-LoRA fine-tuned StyleGAN v1 discriminator'),
    'v2_property_cnn': _fine_tuned(PROPERTY_CNN_FILE, 'Oh-LoRA v2 property-score CNN'),
    'v3_generator': _fine_tuned(GENERATOR_FILES['v3'], 'Oh-LoRA fine-tuned StyleGAN v3 generator (epoch 5)'),
    'v4_generator': _fine_tuned(GENERATOR_FILES['v4'], 'Oh-LoRA fine-tuned StyleGAN v4 generator'),
    'v4_discriminator': _fine_tuned(DISCRIMINATOR_FILES['v4'], 'Oh-LoRA fine-tuned StyleGAN v4 discriminator'),
    **{cnn_key(prop, fold): _cnn(prop, fold) for prop in CNN_PROPERTIES for fold in range(NUM_FOLDS)},
    'facenet_vggface2': WeightSource(
        f'facenet-pytorch InceptionResnetV1 VGGFace2 weights ({IDENTITY_WEIGHTS_FILE}, about 107 MB)',
        lambda layout: layout.identity_weights, url=FACENET_VGGFACE2_URL),
}


def downloads_allowed() -> bool:
    return os.environ.get('OHLORA_NO_DOWNLOAD', '') in ('', '0')


PROBE_TIMEOUT_S = 3.0
PROXY_VARIABLES = ('https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY')


def _hub_endpoint() -> str:
    return os.environ.get('HF_ENDPOINT', 'https://huggingface.co')


def offline_reason(url: str) -> str | None:
    """Why ``url``'s host cannot be reached now (None: it can). One connection attempt with a short timeout, so
    an offline machine gets its one-line error at once instead of after the download libraries' retries."""
    if os.environ.get('HF_HUB_OFFLINE', '') not in ('', '0') and url.startswith(_hub_endpoint()):
        return 'HF_HUB_OFFLINE is set'
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None  # only the proxy knows; let the download try
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == 'https' else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f'offline? no connection to {parsed.hostname}: {exc.strerror or first_line(exc)}'
    return None


def _check_published(source: WeightSource, path: Path) -> None:
    if source.size is not None and path.stat().st_size != source.size:
        raise PipelineError(f'{path} has {path.stat().st_size} bytes, but the {source.description} has '
                            f'{source.size}; delete it to download it again, or pass {source.option}')
    if source.sha256 is not None and weights_digest(path) != source.sha256:
        raise PipelineError(f'{path} does not have the SHA-256 of the {source.description}; '
                            f'delete it to download it again, or pass {source.option}')


def _record_download(layout: Layout, source: WeightSource, dest: Path) -> None:
    atomic.write_json(layout.download_record(dest), {'file': dest.name, 'origin': source.origin,
                                                     'size': dest.stat().st_size, 'sha256': weights_digest(dest)})


def check_download(layout: Layout, source: WeightSource, dest: Path) -> None:
    """A downloaded file must still have the size and SHA-256 recorded when it was downloaded."""
    record_path = layout.download_record(dest)
    remedy = f'delete it and {dest.name} to download again, or pass {source.option}'
    record = read_record(record_path, 'download record', remedy)
    if record is None:
        return  # put in place by hand: nothing to compare with
    size, digest = record.get('size'), record.get('sha256')
    if not isinstance(size, int) or not isinstance(digest, str):
        raise PipelineError(f'{record_path} lacks the size or SHA-256 of the download; {remedy}')
    actual = dest.stat().st_size
    if actual != size:
        raise PipelineError(f'{dest} has {actual} bytes, but {size} were downloaded ({record_path.name}): truncated '
                            f'or replaced; delete it to download it again, or pass {source.option}')
    if weights_digest(dest) != digest:
        raise PipelineError(f'{dest} is not the file that was downloaded (its SHA-256 differs from '
                            f'{record_path.name}): replaced or damaged; delete it to download it again, or pass '
                            f'{source.option}')


def _unavailable(source: WeightSource, dest: Path, reason: str) -> WeightsUnavailable:
    note = f'; {source.note}' if source.note else ''
    return WeightsUnavailable(f'{source.description} is missing: {dest} does not exist and it could not be '
                              f'downloaded from {source.origin} ({reason}){note}; download it by hand to '
                              f'that path or pass {source.option}')


def _download(layout: Layout, source: WeightSource, dest: Path) -> None:
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = atomic.temporary_name(dest, tag='download-').with_suffix('')
    staging.mkdir()
    succeeded = False
    try:
        if source.hf_repo:
            from huggingface_hub import hf_hub_download

            fetched = Path(hf_hub_download(source.hf_repo, source.hf_file, local_dir=staging))
        else:
            from torch.hub import download_url_to_file

            fetched = staging / dest.name
            download_url_to_file(source.url, str(fetched), progress=True)
        _check_published(source, fetched)
        atomic.give_default_mode(fetched)  # the libraries write 0600 temporaries; give the umask's mode
        os.replace(fetched, dest)
        _record_download(layout, source, dest)
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
        check_download(layout, source, dest)
        return dest
    if not downloads_allowed():
        raise _unavailable(source, dest, 'downloads are switched off by OHLORA_NO_DOWNLOAD')
    reason = offline_reason(f'{_hub_endpoint()}/{source.hf_repo}' if source.hf_repo else source.url)
    if reason is not None:
        raise _unavailable(source, dest, reason)
    atomic.remove_stale_temporaries(dest.parent)  # staging folders of downloads that were killed
    try:
        _download(layout, source, dest)
    except PipelineError:
        raise
    except Exception as exc:  # network, HTTP, hub errors: all mean "not available", said in one line
        reason = first_line(exc)
        raise _unavailable(source, dest, f'{type(exc).__name__}: {reason}') from None
    return dest


def fetch_dataset_images(repo_id: str, dest_dir: Path, description: str) -> Path:
    """Download the images (``PUBLISHED_IMAGES_GLOB``) of a Hugging Face dataset into a staging folder beside
    ``dest_dir``.

    Returns the staging folder; the caller moves the files into place and removes it. The hub skips files
    it already has there, so an interrupted import resumes.
    """
    origin = f'https://huggingface.co/datasets/{repo_id}'
    by_hand = f'download the {PUBLISHED_IMAGES_GLOB} files by hand into {dest_dir}'
    if not downloads_allowed():
        raise WeightsUnavailable(f'{description} could not be downloaded from {origin} '
                                 '(downloads are switched off by OHLORA_NO_DOWNLOAD)')
    staging = dest_dir.parent / f'{atomic.TMP_PREFIX}download-{dest_dir.name}'  # no pid: a later run resumes from it
    reason = offline_reason(f'{_hub_endpoint()}/datasets/{repo_id}')
    if reason is not None:
        raise WeightsUnavailable(f'{description} could not be downloaded from {origin} ({reason}); {by_hand}')
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, repo_type='dataset', local_dir=staging, allow_patterns=[PUBLISHED_IMAGES_GLOB])
    except Exception as exc:
        reason = first_line(exc)
        raise WeightsUnavailable(f'{description} could not be downloaded from {origin} '
                                 f'({type(exc).__name__}: {reason}); {by_hand}') from None
    return staging
