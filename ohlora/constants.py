"""The numbers and names every stage shares, defined once (file and folder names live in :mod:`ohlora.layout`).

They are facts of the pipeline's data, not settings: changing one changes what the stage files hold.
"""
from __future__ import annotations

# Every generated image (stage 1, the fine-tuned generators, the CNNs' input) is IMAGE_SIZE x IMAGE_SIZE RGB.
IMAGE_SIZE = 256

# Stage 3: FaceXFormer's input, the face crop and the parsing map are PARSING_SIZE x PARSING_SIZE; a map holds
# the LaPa classes 0 .. NUM_PARSING_CLASSES - 1.
PARSING_SIZE = 224
NUM_PARSING_CLASSES = 11

# Stage 2: the properties the CNN ensembles score, each with NUM_FOLDS fold models.
CNN_PROPERTIES = ('gender', 'quality')
NUM_FOLDS = 5

# Stage 4 onwards: the seven property scores in the standard order (CSV columns, label entries, CNN outputs).
PROPERTY_NAMES = ('eyes', 'hair_color', 'hair_length', 'mouth', 'pose', 'background_mean', 'background_std')
SCORE_COLUMNS = tuple(f'{name}_score' for name in PROPERTY_NAMES)
LABEL_SIZE = len(PROPERTY_NAMES)  # the label of the v1-v3 generators: one z-score per property
