"""FaceXFormer (Kartik-3004/facexformer), re-implemented from MODELS.md §7 with the official state_dict names.

A torchvision Swin-B backbone (built with ``weights=None``: the checkpoint supplies every weight, R11),
SegFormer-style fusion of its four stage outputs, SAM's random-Fourier positional encoding and two-way
transformer, and heads for parsing, landmarks, head pose, attributes, visibility, age, gender and race.
The published ``ckpts/model.pt`` loads strictly through :func:`load_facexformer`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ohlora.checkpoints import check_finite_weights, read_checkpoint, state_dict_mismatch
from ohlora.constants import NUM_PARSING_CLASSES
from ohlora.errors import PipelineError
from ohlora.layout import FACEXFORMER_HUB_FILE
from segmentation.two_way_transformer import TwoWayTransformer

CHECKPOINT_KEY = 'state_dict_backbone'
WHAT = f'FaceXFormer checkpoint (Hugging Face kartiknarayan/facexformer, {FACEXFORMER_HUB_FILE})'

EMBED_DIM = 256
FUSED_SIZE = 56                      # stage-1 resolution for a 224 input: everything is fused at 56x56
STAGE_CHANNELS = (128, 256, 512, 1024)
STAGE_TAPS = (1, 3, 5, 7)            # indices in swin_b.features of the four Swin stages (before PatchMerging)

# The task tokens in the official order, each with its head's output width.
TASK_HEADS = (('landmarks', 136), ('pose', 3), ('attribute', 40), ('visibility', 29),
              ('age', 8), ('gender', 2), ('race', 5))
# Task ids of the official forward: which rows of each output it keeps.
TASK_IDS = {'segmentation': 0, 'landmarks': 1, 'pose': 2, 'attribute': 3,
            'age': 4, 'gender': 4, 'race': 4, 'visibility': 5}


class MLP(nn.Module):
    """``layers`` Linear maps with ReLU between them and none after the last."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == last else F.relu(layer(x))
        return x


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map, computed by hand as the official code does (eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PositionEmbeddingRandom(nn.Module):
    """SAM's random-Fourier positional encoding; the 2x128 Gaussian matrix is a persistent (loaded) buffer."""

    def __init__(self, num_pos_feats: int = 128):
        super().__init__()
        self.register_buffer('positional_encoding_gaussian_matrix', torch.randn(2, num_pos_feats))

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """The C×H×W encoding of the cell centres of an H×W grid, (x, y) order, sin channels then cos."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        grid = torch.ones((h, w), device=matrix.device, dtype=matrix.dtype)
        y = (grid.cumsum(dim=0) - 0.5) / h
        x = (grid.cumsum(dim=1) - 0.5) / w
        coords = 2 * torch.stack([x, y], dim=-1) - 1
        coords = 2 * math.pi * (coords @ matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).permute(2, 0, 1)


class StageProjection(nn.Module):
    """SegFormer's per-token Linear from a stage's channels to the fusion width (``linear_c.i.proj``)."""

    def __init__(self, input_dim: int, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).permute(0, 2, 1).reshape(b, -1, h, w)


class FaceDecoder(nn.Module):
    """Task and mask tokens through the two-way transformer; the heads and the hypernetwork mask output."""

    def __init__(self, transformer_dim: int = EMBED_DIM, num_mask_tokens: int = NUM_PARSING_CLASSES):
        super().__init__()
        self.transformer = TwoWayTransformer(depth=2, embedding_dim=transformer_dim, num_heads=8, mlp_dim=2048)
        for name, _ in TASK_HEADS:
            setattr(self, f'{name}_token', nn.Embedding(1, transformer_dim))
        self.mask_tokens = nn.Embedding(num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        # One hypernetwork MLP shared by all mask tokens (SAM has one per token).
        self.output_hypernetwork_mlps = MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
        for name, width in TASK_HEADS:
            setattr(self, f'{name}_prediction_head', MLP(transformer_dim, transformer_dim, width, 3))

    def tokens(self) -> torch.Tensor:
        """The 18 initial tokens: 7 task tokens in the official order, then the 11 mask tokens."""
        parts = [getattr(self, f'{name}_token').weight for name, _ in TASK_HEADS]
        return torch.cat(parts + [self.mask_tokens.weight], dim=0)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, heads: bool = True) -> dict:
        """image_embeddings: B×256×56×56, image_pe: 256×56×56 -> {'segmentation': B×11×224×224, heads...}."""
        b, c, h, w = image_embeddings.shape
        initial = self.tokens().unsqueeze(0).expand(b, -1, -1)
        pe = image_pe.unsqueeze(0).expand(b, -1, -1, -1)
        hs, src = self.transformer(image_embeddings, pe, initial)
        num_tasks = len(TASK_HEADS)

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = self.output_hypernetwork_mlps(hs[:, num_tasks:, :])
        ub, uc, uh, uw = upscaled.shape
        outputs = {'segmentation': (hyper_in @ upscaled.reshape(ub, uc, uh * uw)).reshape(ub, -1, uh, uw)}
        if heads:
            for i, (name, _) in enumerate(TASK_HEADS):
                outputs[name] = getattr(self, f'{name}_prediction_head')(hs[:, i, :])
        return outputs


class FaceXFormer(nn.Module):
    """The official model: ``backbone`` (Swin-B without its classifier), ``pe_layer``, ``face_decoder``,
    ``linear_c`` and ``linear_fuse``, in the official order and with the official names (505 entries)."""

    def __init__(self):
        super().__init__()
        swin = torchvision.models.swin_b(weights=None)
        # features, norm, permute, avgpool, flatten: the classification head is not part of the model.
        self.backbone = nn.Sequential(*list(swin.children())[:-1])
        self.pe_layer = PositionEmbeddingRandom(EMBED_DIM // 2)
        self.face_decoder = FaceDecoder()
        self.linear_c = nn.ModuleList(StageProjection(c) for c in STAGE_CHANNELS)
        self.linear_fuse = nn.Conv2d(EMBED_DIM * len(STAGE_CHANNELS), EMBED_DIM, kernel_size=1, bias=False)

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four Swin stage outputs as NCHW maps, taken before the final norm.

        The official model runs the whole backbone and taps these with hooks; its final norm, pooling and
        flatten never reach an output, so they are skipped here (their weights stay in the state_dict).
        """
        taps = []
        for i, layer in enumerate(self.backbone[0]):
            x = layer(x)
            if i in STAGE_TAPS:
                taps.append(x.permute(0, 3, 1, 2))
        return taps

    def fuse(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """Per-stage projection, bilinear to 56x56, concatenation from the deepest stage down, 1x1 conv."""
        size = stages[0].shape[2:]
        projected = [F.interpolate(proj(s), size=size, mode='bilinear', align_corners=False)
                     for proj, s in zip(self.linear_c, stages)]
        return self.linear_fuse(torch.cat(projected[::-1], dim=1))

    def decode(self, x: torch.Tensor, heads: bool = True) -> dict:
        """Every output for every sample, before the official task filter (see :meth:`forward`)."""
        fused = self.fuse(self.stage_features(x))
        pe = self.pe_layer(tuple(fused.shape[2:]))
        return self.face_decoder(fused, pe, heads=heads)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Parsing logits B×11×224×224 of an ImageNet-normalised B×3×224×224 batch (other heads skipped)."""
        return self.decode(x, heads=False)['segmentation']

    def forward(self, x: torch.Tensor, labels=None, tasks: torch.Tensor | None = None):
        """The official interface: ``(landmarks, pose, attribute, visibility, age, gender, race, segmentation)``,
        each keeping only the rows whose ``tasks`` entry selects it. ``labels`` is unused, as upstream."""
        outputs = self.decode(x)
        if tasks is None:
            tasks = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        order = [name for name, _ in TASK_HEADS] + ['segmentation']
        return tuple(outputs[name][tasks == TASK_IDS[name]] for name in order)


def checkpoint_state_dict(checkpoint: dict, path: str | Path) -> dict:
    """The model's entries of a loaded FaceXFormer checkpoint (``checkpoint['state_dict_backbone']``).

    A bare state_dict of the right model (someone saved only the weights) is accepted as it is; any other
    dict, e.g. a GenForce or Oh-LoRA file, is rejected naming what it holds instead.
    """
    if CHECKPOINT_KEY in checkpoint:
        state = checkpoint[CHECKPOINT_KEY]
        if not isinstance(state, dict):
            raise PipelineError(f"{path}: '{CHECKPOINT_KEY}' holds a {type(state).__name__}, not a state_dict "
                                f'(expected the {WHAT})')
        return state
    if 'backbone.0.0.0.weight' in checkpoint:
        return checkpoint
    keys = list(checkpoint)
    shown = ', '.join(map(str, keys[:4])) + (f', … ({len(keys)} in all)' if len(keys) > 4 else '')
    raise PipelineError(f"{path} has no '{CHECKPOINT_KEY}' entry (its top-level keys: {shown or 'none'}); "
                        f'expected the {WHAT}')


def load_facexformer(path: str | Path, device: torch.device | str = 'cpu') -> FaceXFormer:
    """The FaceXFormer of a checkpoint file, strictly loaded, in eval mode on ``device``."""
    state = checkpoint_state_dict(read_checkpoint(path, WHAT), path)
    return facexformer_from_state_dict(state, path, device)


def facexformer_from_state_dict(state: dict, source: str | Path = 'the state_dict',
                                device: torch.device | str = 'cpu') -> FaceXFormer:
    """A FaceXFormer holding exactly ``state`` (505 entries, names and shapes checked), in eval mode.

    The module is built on the meta device and takes the given tensors: every entry comes from ``state``,
    so initialising 88 M Swin weights first would only cost time (about 2.5 s per build).
    """
    with torch.device('meta'):
        model = FaceXFormer()
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise PipelineError(f'{source}: {len(not_tensors)} entries are not tensors (e.g. {not_tensors[0]}); '
                            f'expected the {WHAT}')
    problem = state_dict_mismatch(model, state)
    if problem:
        raise PipelineError(f'{source} does not fit the FaceXFormer model: {problem}')
    expected = model.state_dict()
    state = {k: v.to(dtype=expected[k].dtype).contiguous() for k, v in state.items()}
    check_finite_weights(state, source, WHAT)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()
