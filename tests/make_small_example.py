"""Inputs of the small example (docs/small-example.md) that do not ship with the tests, and the two stand-in steps.

The whole pipeline runs on tiny weights in minutes on a CPU, but two of its measurements need inputs whose
answer is known, and a few weights files have no tiny published form. This script writes them:

* ``cnn_weights/{gender,quality}_model_{0..4}.pt``: full-size stage-2 CNNs (the loaders are strict) whose weights
  are all zero, so each fold outputs the constant sigmoid(bias) of its final bias: gender 0.76, 0.78, 0.80, 0.82,
  0.84 (ensemble 0.80), quality 0.91 … 0.99 (ensemble 0.95). Every scored image passes the stage-2 filter
  (0.7 / 0.9), so which images are kept is decided by ``labels.csv`` alone.
* ``labels.csv``: hand labels of three images: 0 good and a woman (kept), 1 labelled a man, 2 labelled a bad
  image (both dropped).
* ``portraits/000000.jpg`` … ``000007.jpg``: the 256x256 stand-ins for the stage-1 images. 0–6 are the drawn
  stage-4 test cases of the same number (tests/data/ohlora/property_scores/fixtures, whose parsing maps and
  upstream scores are known); 7 is a sky without a face, which stage 3 must skip.
* ``known_maps/parsing_NNNNNN.png``, ``face_NNNNNN.png``: the drawn cases' exact class maps and face crops. A
  tiny or synthetic FaceXFormer cannot parse a face, so after stage 3 has run for real these replace the maps
  it wrote, and stage 4's scores become the upstream's scores of those cases.
* ``facexformer_synthetic.pt``: a checkpoint of the published FaceXFormer layout filled by the synthetic-weights
  rule of the reference tests (369 MB): stage 3 runs the real network on it.

Usage (``--out`` is the folder the files go to; the last two forms are the stand-in steps of the example)::

    python tests/make_small_example.py --out runs/small_inputs
    python tests/make_small_example.py --out runs/small_inputs --use-portraits runs/small
    python tests/make_small_example.py --out runs/small_inputs --use-known-maps runs/small

``tests/test_end_to_end.py`` builds its inputs with the same functions.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS.parent) not in sys.path:  # run as a script from a checkout without an install
    sys.path.insert(0, str(TESTS.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cnn.models import MODEL_CLASSES  # noqa: E402
from ohlora import atomic  # noqa: E402
from ohlora.layout import NUM_FOLDS, Layout, image_name, parse_img_no  # noqa: E402
from segmentation.facexformer_synthetic import write_synthetic_checkpoint  # noqa: E402

DATA = TESTS / 'data'
TINY_GENFORCE = DATA / 'genforce' / 'tiny_ckpt.pth'
PROPERTY_FIXTURES = DATA / 'ohlora' / 'property_scores' / 'fixtures'

PORTRAIT_CASES = (0, 1, 2, 3, 4, 5, 6)          # portrait n is drawn case n
NO_FACE_IMG_NO = 7
NUM_IMAGES = len(PORTRAIT_CASES) + 1
FOLD_OUTPUTS = {'gender': (0.76, 0.78, 0.80, 0.82, 0.84), 'quality': (0.91, 0.93, 0.95, 0.97, 0.99)}
LABELS = {0: (1, 1), 1: (1, 0), 2: (0, 1)}      # img_no: (quality, gender), 1 = good / woman


@dataclass(frozen=True)
class SmallExample:
    """The paths of the built inputs."""
    folder: Path

    @property
    def cnn_weights(self) -> Path:
        return self.folder / 'cnn_weights'

    def cnn_model(self, prop: str, fold: int) -> Path:
        return self.cnn_weights / f'{prop}_model_{fold}.pt'

    @property
    def labels(self) -> Path:
        return self.folder / 'labels.csv'

    @property
    def portraits(self) -> Path:
        return self.folder / 'portraits'

    @property
    def known_maps(self) -> Path:
        return self.folder / 'known_maps'

    def known_map(self, img_no: int) -> Path:
        return self.known_maps / f'parsing_{img_no:06d}.png'

    def known_face(self, img_no: int) -> Path:
        return self.known_maps / f'face_{img_no:06d}.png'

    @property
    def facexformer(self) -> Path:
        return self.folder / 'facexformer_synthetic.pt'


def fail(message: str):
    """One ``error:`` line and exit status 2, as the stage scripts do."""
    print(f'error: {message}', file=sys.stderr)
    raise SystemExit(2)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def constant_cnn_state(prop: str, output: float) -> dict[str, torch.Tensor]:
    """A full-size gender/quality CNN state_dict that outputs ``output`` for every image (dropout cannot change
    a zero weight's contribution, so the output is the same in train mode)."""
    state = {k: torch.zeros_like(v) for k, v in MODEL_CLASSES[prop]().state_dict().items()}
    state['fc_final.0.bias'][0] = logit(output)
    return state


def write_cnn_weights(example: SmallExample) -> None:
    for prop, outputs in FOLD_OUTPUTS.items():
        assert len(outputs) == NUM_FOLDS
        for fold, output in enumerate(outputs):
            atomic.torch_save(example.cnn_model(prop, fold), constant_cnn_state(prop, output))


def write_labels(example: SmallExample) -> None:
    rows = ''.join(f'{n},{q},{g}\n' for n, (q, g) in sorted(LABELS.items()))
    atomic.write_text(example.labels, 'img_name,quality,gender\n' + rows)


def sky() -> np.ndarray:
    """A 256x256 BGR picture with no face: a smooth sky over a green field."""
    rows = np.linspace(0.0, 1.0, 256)[:, None, None]
    top, horizon = np.array([200, 120, 40]), np.array([250, 225, 190])  # BGR
    image = np.broadcast_to(top + (horizon - top) * rows, (256, 256, 3)).copy()
    image[190:] = (60, 150, 70)
    return image.astype(np.uint8)


def write_portraits(example: SmallExample) -> None:
    for img_no, case in enumerate(PORTRAIT_CASES):
        atomic.write_bytes(example.portraits / image_name(img_no), (PROPERTY_FIXTURES / image_name(case)).read_bytes())
    atomic.write_image(example.portraits / image_name(NO_FACE_IMG_NO), sky())


def write_known_maps(example: SmallExample) -> None:
    for img_no, case in enumerate(PORTRAIT_CASES):
        atomic.write_bytes(example.known_map(img_no), (PROPERTY_FIXTURES / f'parsing_{case:06d}.png').read_bytes())
        atomic.write_bytes(example.known_face(img_no), (PROPERTY_FIXTURES / f'face_{case:06d}.png').read_bytes())


def build(out: str | Path, facexformer: bool = True) -> SmallExample:
    """Write every input of the small example under ``out``; ``facexformer=False`` skips the 369 MB checkpoint."""
    example = SmallExample(Path(out))
    write_cnn_weights(example)
    write_labels(example)
    write_portraits(example)
    write_known_maps(example)
    if facexformer:
        write_synthetic_checkpoint(example.facexformer)
    return example


def use_portraits(example: SmallExample, root: str | Path) -> list[int]:
    """Replace the images stage 1 wrote under ``root`` by the portraits of the same number."""
    layout = Layout(root)
    written = sorted(n for n in map(parse_img_no, (p.name for p in layout.synthesized_dir.glob('*.jpg')))
                     if n is not None)
    if written != list(range(NUM_IMAGES)):
        fail(f'{layout.synthesized_dir} holds images {written}; run stage 1 with --num '
                         f'{NUM_IMAGES} first')
    for img_no in written:
        shutil.copyfile(example.portraits / image_name(img_no), layout.synthesized_image(img_no))
    return written


def use_known_maps(example: SmallExample, root: str | Path) -> list[int]:
    """Replace every parsing map (and its face crop) that stage 3 wrote under ``root`` by the known one."""
    layout = Layout(root)
    parsed = [n for n in range(NUM_IMAGES) if layout.parsing_map(n).is_file()]
    if not parsed:
        fail(f'{layout.segmentation_dir} holds no parsing maps; run stage 3 '
                         '(run_segmentation.py) first')
    for img_no in parsed:
        if not example.known_map(img_no).is_file():
            fail(f'stage 3 parsed image {img_no}, which has no known map in {example.known_maps}')
        shutil.copyfile(example.known_map(img_no), layout.parsing_map(img_no))
        shutil.copyfile(example.known_face(img_no), layout.face_crop(img_no))
    return parsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='See docs/small-example.md for the whole run.')
    parser.add_argument('--out', required=True, help='folder of the small example inputs')
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument('--use-portraits', metavar='ROOT',
                       help='after stage 1: replace the images it wrote under ROOT by the portraits')
    steps.add_argument('--use-known-maps', metavar='ROOT',
                       help='after stage 3: replace the parsing maps and face crops it wrote under ROOT by the known ones')
    args = parser.parse_args(argv)
    example = SmallExample(Path(args.out))
    if (args.use_portraits or args.use_known_maps) and not example.known_maps.is_dir():
        fail(f'{example.folder} holds no small example inputs; run '
                         f'python tests/make_small_example.py --out {example.folder} first')
    if args.use_portraits:
        print(f'replaced images {use_portraits(example, args.use_portraits)} by the portraits')
    elif args.use_known_maps:
        print(f'replaced the maps of images {use_known_maps(example, args.use_known_maps)} by the known ones')
    else:
        build(example.folder)
        print(f'wrote the small example inputs to {example.folder}')


if __name__ == '__main__':
    main()
