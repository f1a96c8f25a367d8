"""The two properties stage 2 scores, and the numbers upstream attached to each."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PropertySpec:
    name: str                  # 'gender' or 'quality': also the CSV column / file name stem
    success_bce: float         # a fold succeeds when its best validation BCE is at most this
    metric_threshold: float    # positive/negative cut for the logged accuracy, F1, ... (not for filtering)
    stratified: bool           # StratifiedKFold on the label (quality: 95 bad in 2,000) or plain KFold
    keep_threshold: float      # default filter: keep an image whose score is at least this
    meaning: str               # what a score of 1 means


GENDER = PropertySpec('gender', success_bce=0.35, metric_threshold=0.5, stratified=False, keep_threshold=0.7,
                      meaning='woman')
QUALITY = PropertySpec('quality', success_bce=0.13, metric_threshold=0.9, stratified=True, keep_threshold=0.9,
                       meaning='good image')

# Upstream trains and scores quality first, then gender; the same order keeps logs comparable.
PROPERTIES: dict[str, PropertySpec] = {'quality': QUALITY, 'gender': GENDER}
