"""MTCNN face detection and the upstream face crop (PIPELINE.md §5, MODELS.md §7.4 and §8).

facenet-pytorch 2.5.3's MTCNN with its shipped weights and default settings finds the faces; the largest
box grows by 25 % of its size on each side, is clamped to the image, truncated with ``int()`` and cropped
with Pillow, with no padding and no squaring, exactly as the upstream inference does.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ohlora.errors import PipelineError

MARGIN_PERCENTAGE = 50  # upstream ``adjust_bbox``: split over the two sides, so 25 % of the size per side


@dataclass(frozen=True)
class FaceBox:
    """The detected box (x1, y1, x2, y2) in pixels, its probability, and the crop taken from it."""
    box: tuple[float, float, float, float]
    prob: float
    grown: tuple[float, float, float, float]
    crop_box: tuple[int, int, int, int]


def grow_box(box, width: int, height: int, margin_percentage: float = MARGIN_PERCENTAGE):
    """Grow each side by half the margin of the box size and clamp to the image, in float64 as upstream."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx = (x2 - x1) * (margin_percentage / 100) / 2
    dy = (y2 - y1) * (margin_percentage / 100) / 2
    return max(0.0, x1 - dx), max(0.0, y1 - dy), min(float(width), x2 + dx), min(float(height), y2 + dy)


def crop_box_of(grown) -> tuple[int, int, int, int]:
    """``int()`` of each edge: truncation toward zero, as the upstream ``image.crop`` call."""
    return tuple(int(v) for v in grown)


class FaceDetector:
    """MTCNN built once per run (CPU, facenet-pytorch defaults, shipped weights); largest face per image.

    MTCNN stays on the CPU whatever the parsing device, as upstream ran it: its boxes move slightly across
    devices, and a box edge that crosses an integer moves the crop by a pixel.
    """

    def __init__(self):
        try:
            from facenet_pytorch import MTCNN
        except ImportError as exc:  # the one optional-looking dependency: say what to install
            raise PipelineError(f'facenet-pytorch is needed for face detection (pip install '
                                f'facenet-pytorch==2.5.3): {exc}') from None
        # keep_all only affects MTCNN.forward(); detect() returns every box, sorted by area (select_largest).
        self.mtcnn = MTCNN(keep_all=True, device='cpu')
        self.mtcnn.eval()
        # MTCNN's image pyramid starts at scale 12 / min_face_size; an image whose short side is below
        # min_face_size gets no scale at all, and detect() fails inside torch.cat.
        self.min_side = int(self.mtcnn.min_face_size)

    def detect(self, image: Image.Image) -> FaceBox | None:
        """The largest face of an RGB image (not the most probable one, as upstream), or None."""
        boxes, probs = self.mtcnn.detect(image)
        if boxes is None or len(boxes) == 0:
            return None
        box = tuple(float(v) for v in boxes[0])
        grown = grow_box(box, *image.size)
        return FaceBox(box=box, prob=float(probs[0]), grown=grown, crop_box=crop_box_of(grown))
