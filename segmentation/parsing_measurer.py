"""Stages 3 and 4 on images in memory: MTCNN crop -> FaceXFormer -> property scores -> z-scores.

Per image the same steps and arithmetic as the stages on files: the largest MTCNN face grown by 25 % per side
(:class:`~segmentation.face_detection.FaceDetector`, CPU, one image at a time, so a box never depends on which
images share a batch), the Pillow bicubic 224x224 crop, ImageNet normalisation, FaceXFormer's class map
(batched on the device), then algorithm 1 (colours from the whole image resized to 224x224 bilinearly, as
stage 4 reads the original) or algorithm 2 (colours from the truncated face crop, as stage 3's
``face_NNNNNN.png``), normalised with the saved statistics and rounded to 4 decimals as stage 4. No file is
written. An image without a face (or with an empty box) gives a row of NaN: "not measured"; so does, with stage
3's guards, an image smaller than the detector can read (``detector.min_side``, MTCNN's min_face_size: its image
pyramid would be empty) and one on which the detector fails (MTCNN raises inside torch on degenerate images):
one image never stops the run.

The detector and parser are injected: anything with ``detect(PIL image) -> FaceBox | None`` and
``segment(B x 3 x 224 x 224) -> B x 11 x 224 x 224 logits`` works (tests use drawn faces and a colour parser).
"""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from ohlora.constants import PARSING_SIZE, PROPERTY_NAMES, SCORE_COLUMNS
from ohlora.errors import first_line
from segmentation import property_scores_alg1 as alg1
from segmentation import property_scores_alg2 as alg2
from segmentation.face_detection import MARGIN_PERCENTAGE
from segmentation.face_input import face_png_pixels, normalize, resized_crop
from segmentation.score_normalization import DECIMALS, ColumnStats, normalise_with_stats

ALGORITHMS = {1: alg1, 2: alg2}
DETECTION_ERRORS = (RuntimeError, ValueError, IndexError)  # what MTCNN raises on degenerate images (as stage 3)

logger = logging.getLogger(__name__)


class ParsingMeasurer:
    name = 'parsing'
    image_size = None

    def __init__(self, parser, detector, algorithm: int, stats: dict[str, ColumnStats], settings: dict | None = None):
        if algorithm not in ALGORITHMS:
            raise ValueError(f'unknown property-score algorithm {algorithm}; choose 1 or 2')
        missing = [c for c in SCORE_COLUMNS if c not in stats]
        if missing:
            raise ValueError(f'statistics lack {", ".join(missing)}')
        self.parser = parser
        self.detector = detector
        self.min_side = int(getattr(detector, 'min_side', 0) or 0)
        self._warned_size = False
        self.algorithm = algorithm
        self.stats = stats
        colours = ('the whole image, OpenCV bilinear to 224x224' if algorithm == 1
                   else 'the truncated 224x224 face crop')
        self._settings = {'measure': self.name, 'algorithm': algorithm,
                          'detector': f'MTCNN (facenet-pytorch), CPU, largest face, margin {MARGIN_PERCENTAGE} %',
                          'crop': 'Pillow crop + bicubic 224x224', 'colours': colours, 'decimals': DECIMALS,
                          'statistics': {c: [s.mean, s.std] for c, s in stats.items()}, **(settings or {})}

    def settings(self) -> dict:
        return dict(self._settings)

    def _device(self) -> torch.device:
        parameters = getattr(self.parser, 'parameters', None)
        first = next(parameters(), None) if callable(parameters) else None
        return first.device if first is not None else torch.device('cpu')

    def measure(self, images: np.ndarray) -> np.ndarray:
        result = np.full((len(images), len(PROPERTY_NAMES)), np.nan)
        crops, found = [], []
        for index, rgb in enumerate(images):
            image = Image.fromarray(np.ascontiguousarray(rgb))
            if min(image.size) < self.min_side:
                if not self._warned_size:
                    logger.warning('images of %dx%d pixels are too small for face detection (at least %dx%d); they '
                                   'count as not measured', image.size[0], image.size[1], self.min_side, self.min_side)
                    self._warned_size = True
                continue
            try:
                with torch.inference_mode():
                    face = self.detector.detect(image)
            except DETECTION_ERRORS as exc:
                logger.info('image %d of the batch: face detection failed (%s); not measured', index,
                            first_line(exc, 120))
                continue
            if face is None:
                continue
            x1, y1, x2, y2 = face.crop_box
            if x2 <= x1 or y2 <= y1:
                continue
            crops.append(resized_crop(image, face.crop_box))
            found.append(index)
        if not found:
            return result
        inputs = normalize(np.stack(crops))
        with torch.inference_mode():
            class_maps = self.parser.segment(inputs.to(self._device())).argmax(dim=1).to(torch.uint8).cpu().numpy()
        raw = []
        if self.algorithm == 2:
            faces_bgr = face_png_pixels(inputs)[..., ::-1]
            for k, index in enumerate(found):
                raw.append(alg2.compute_scores(index, class_maps[k], np.ascontiguousarray(faces_bgr[k])).values)
        else:
            for k, index in enumerate(found):
                bgr = np.ascontiguousarray(images[index][..., ::-1])
                colour = cv2.resize(bgr, (PARSING_SIZE, PARSING_SIZE), interpolation=cv2.INTER_LINEAR)
                raw.append(alg1.compute_scores(index, class_maps[k], colour).values)
        frame = pd.DataFrame(raw, columns=list(SCORE_COLUMNS), dtype=np.float64)
        result[found] = normalise_with_stats(frame, self.stats)[list(SCORE_COLUMNS)].to_numpy(dtype=np.float64)
        return result
