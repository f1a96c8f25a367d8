"""Is it still the same person? Face embeddings (facenet-pytorch ``InceptionResnetV1``, VGGFace2) and their cosines.

Crop: a **fixed box**, not a detector. The generators draw aligned faces (CelebA-aligned StyleGAN, faces at
the same place in every image), so one box holds the face in every image: x 40-216, y 64-240 of a 256x256
image (fractions 5/32, 1/4, 27/32, 15/16 of the width/height for other sizes), roughly brow to chin as
facenet's MTCNN crops are. A detector would add a box jitter that differs between the images of one z and
would be counted as a change of identity. Standardisation: the box resized to 160x160 (bilinear,
antialiased), then ``(x - 127.5) / 128`` as facenet-pytorch's ``fixed_image_standardization``.

Identity of one z = the mean cosine similarity over all pairs of its images (1.0: the same embedding
everywhere); per image, the mean cosine with the other images of its z, whose mean over the z is the same number.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ohlora.checkpoints import load_strict, read_checkpoint
from ohlora.errors import PipelineError
from ohlora.layout import IDENTITY_WEIGHTS_FILE
from ohlora.records import sha256_of

IDENTITY_BOX = (5 / 32, 1 / 4, 27 / 32, 15 / 16)  # x1, y1, x2, y2 as fractions of the width / height
INPUT_SIZE = 160
WHAT = f'facenet-pytorch InceptionResnetV1 state_dict (e.g. {IDENTITY_WEIGHTS_FILE})'


def identity_box(height: int, width: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = IDENTITY_BOX
    return round(x1 * width), round(y1 * height), round(x2 * width), round(y2 * height)


class FaceEmbedder:
    def __init__(self, model: torch.nn.Module, weights_sha256: str | None = None):
        self.model = model.eval()
        self._settings = {'model': 'facenet-pytorch InceptionResnetV1 (classify=False, eval)',
                          'weights_sha256': weights_sha256,
                          'crop': 'fixed box x 5/32-27/32, y 1/4-15/16 of the image (40:216, 64:240 at 256)',
                          'input': f'{INPUT_SIZE}x{INPUT_SIZE} bilinear antialiased, (x - 127.5) / 128'}

    def settings(self) -> dict:
        return dict(self._settings)

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> np.ndarray:
        """Unit-length embeddings (N, 512), float64, of uint8 RGB images (N, H, W, 3)."""
        device = next(self.model.parameters()).device
        height, width = images.shape[1:3]
        x1, y1, x2, y2 = identity_box(height, width)
        x = torch.from_numpy(np.ascontiguousarray(images[:, y1:y2, x1:x2])).to(device).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode='bilinear', align_corners=False, antialias=True)
        embeddings = self.model((x - 127.5) / 128.0)
        return F.normalize(embeddings.double(), dim=1).cpu().numpy()


def identity_scores(embeddings: np.ndarray) -> np.ndarray:
    """Per image, the mean cosine similarity with the other images of the group (NaN for a group of one)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    n = len(embeddings)
    if n < 2:
        return np.full(n, np.nan)
    similarity = embeddings @ embeddings.T
    return np.clip((similarity.sum(axis=1) - np.diag(similarity)) / (n - 1), -1.0, 1.0)  # round-off


def new_inception_resnet() -> torch.nn.Module:
    try:
        from facenet_pytorch import InceptionResnetV1
    except ImportError as exc:
        raise PipelineError(f'facenet-pytorch is needed for the identity figure (pip install '
                            f'facenet-pytorch==2.5.3): {exc}') from None
    return InceptionResnetV1(pretrained=None, classify=False)


def load_face_embedder(path: str | Path, device: torch.device | str = 'cpu') -> FaceEmbedder:
    """InceptionResnetV1 from a state_dict file (weights_only, strict; the classifier ``logits.*`` is unused)."""
    path = Path(path)
    state_dict = read_checkpoint(path, WHAT)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith('logits.')}
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise PipelineError(f'{path} holds entries that are not tensors; expected the {WHAT}')
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise PipelineError(f'{path} holds NaN or infinite values ({", ".join(broken[:3])}); expected the {WHAT}')
    model = new_inception_resnet()
    # Files saved before BatchNorm counted its batches lack these counters, which eval mode never reads.
    for key, value in model.state_dict().items():
        if key.endswith('num_batches_tracked'):
            state_dict.setdefault(key, torch.zeros_like(value))
    load_strict(model, state_dict, path, WHAT)
    return FaceEmbedder(model.to(device), sha256_of(path))
