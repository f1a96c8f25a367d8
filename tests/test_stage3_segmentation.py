"""Stage 3: MTCNN crop against the stored reference, the stage's files, resume, skips and bad input.

The full end-to-end test runs run_segmentation.py with a checkpoint laid out like the published
``ckpts/model.pt`` and filled by the synthetic-weights rule, written to a temporary folder (369 MB, removed
afterwards, never committed). The other stage tests inject a cheap stand-in model at the library level.
"""
import hashlib
import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ohlora.layout import Layout
from script_runner import files_of, run_script
from segmentation.face_detection import FaceDetector, crop_box_of, grow_box
from segmentation.face_input import face_png_pixels, normalize, resized_crop
from segmentation.parsing import (
    CLASS_COLOURS, NO_FACE, StageRecord, _prefetched, list_input_images, plan_work, run_stage, visualization)

SCRIPT = 'run_segmentation.py'


@pytest.fixture(scope='module')
def detector():
    return FaceDetector()


class StandInParser:
    """A cheap model with FaceXFormer's ``segment`` interface: the class follows the red channel."""

    def __init__(self):
        self.batches = []

    def segment(self, x):
        self.batches.append(x.shape[0])
        classes = torch.arange(11, dtype=x.dtype).view(1, 11, 1, 1)
        return -(x[:, :1] * 2.5 + 5 - classes).abs()


def stand_in_map(face_rgb_uint8_crop):
    x = normalize(face_rgb_uint8_crop)
    return StandInParser().segment(x).argmax(1)[0].numpy().astype(np.uint8)


def drawn_on_canvas(facexformer_dir) -> Image.Image:
    """A 256x256 image like the stage-1 output: the drawn cartoon face pasted on a plain background."""
    canvas = Image.new('RGB', (256, 256), (40, 90, 160))
    canvas.paste(Image.open(facexformer_dir / 'drawn_face_A.png').convert('RGB'), (16, 20))
    return canvas


def noise_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))


def read_map(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint8 and image.shape == (224, 224)  # single channel, 8 bit
    return image


def read_rgb_png(path):
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]


# --- detection and crop ---------------------------------------------------------------------------------

def test_mtcnn_crop_of_the_astronaut_matches_the_reference(detector, facexformer_ref, facexformer_dir):
    photo = Image.open(facexformer_dir / 'astronaut.png').convert('RGB')
    face = detector.detect(photo)
    np.testing.assert_allclose(face.box, facexformer_ref['mtcnn_boxes'][0].numpy(), atol=1e-3)
    assert face.prob == pytest.approx(facexformer_ref['mtcnn_probs'][0].item(), abs=1e-5)
    np.testing.assert_allclose(face.grown, facexformer_ref['adjusted_box'].numpy(), atol=1e-3)
    assert face.crop_box == tuple(facexformer_ref['crop_box'].tolist()) == (159, 34, 289, 199)

    crop = resized_crop(photo, face.crop_box)
    assert np.array_equal(crop, facexformer_ref['crop_resized_uint8'].numpy())
    inputs = normalize(np.stack([facexformer_ref['drawn_face_uint8'].numpy(), crop]))
    assert list(inputs.shape) == facexformer_ref['input_shape'] and inputs.dtype == torch.float32
    # bit-identical to the reference input (tests/data keeps its SHA-256, not the 1.2 MB tensor)
    assert hashlib.sha256(inputs.numpy().tobytes()).hexdigest() == facexformer_ref['input_sha256']
    face_png = face_png_pixels(inputs)
    assert np.array_equal(face_png[0], facexformer_ref['face_png_rgb'][0].numpy())
    assert np.array_equal(face_png[1], read_rgb_png(facexformer_dir / 'face_astronaut.png'))
    assert (face_png[1].astype(int) - crop).min() == -1  # upstream's truncation, kept on purpose


def test_mtcnn_takes_the_largest_face_of_the_drawing(detector, facexformer_ref):
    face = detector.detect(Image.fromarray(facexformer_ref['drawn_face_uint8'].numpy()))
    np.testing.assert_allclose(face.box, facexformer_ref['drawn_mtcnn_boxes'][0].numpy(), atol=1e-3)
    # clamped at the bottom
    assert face.crop_box == tuple(facexformer_ref['drawn_crop_box'].tolist()) == (24, 6, 206, 224)
    assert detector.detect(noise_image()) is None


def test_box_growth_is_a_quarter_per_side_clamped_and_truncated():
    grown = grow_box((10.0, 20.0, 50.0, 100.0), 60, 110)
    assert grown == (0.0, 0.0, 60.0, 110.0)
    grown = grow_box((100.0, 100.0, 140.0, 180.0), 256, 256)
    assert grown == (90.0, 80.0, 150.0, 200.0)
    assert crop_box_of((159.99, 34.68, 289.42, 199.52)) == (159, 34, 289, 199)  # int(), never rounding


# --- the stage with a stand-in model (cheap) ------------------------------------------------------------

@pytest.fixture()
def mixed_folder(tmp_path, facexformer_dir):
    """Filtered-images folder with faces, a faceless image, a corrupt file, odd modes and a stray file."""
    layout = Layout(tmp_path / 'root')
    folder = layout.filtered_dir
    folder.mkdir(parents=True)
    drawn_on_canvas(facexformer_dir).save(folder / '000003.jpg', quality=95)
    shutil.copy(facexformer_dir / 'drawn_face_A.png', folder / '000007.png')
    Image.open(facexformer_dir / 'drawn_face_A.png').convert('RGBA').save(folder / '000008.png')
    noise_image().save(folder / '000010.jpg')
    (folder / '000011.jpg').write_bytes(b'\xff\xd8 this is not a jpeg')
    (folder / 'readme.txt').write_text('not an image')
    (folder / '.tmp-123.jpg').write_bytes(b'')
    return layout


STAND_IN_SETTINGS = {'weights_sha256': 'stand-in parser'}


def run_with_stand_in(layout, detector, batch_size=2, settings=STAND_IN_SETTINGS):
    inputs = list_input_images(layout.filtered_dir)
    work = plan_work(layout, inputs, settings)
    model = StandInParser()
    summary = run_stage(layout, model, detector, work.pending, batch_size, torch.device('cpu'), progress=False,
                        present={n for n, _ in inputs.images}, record=StageRecord(layout, settings, work.inputs, {}))
    return inputs, work, model, summary


def test_stage_files_skips_and_resume(mixed_folder, detector, facexformer_ref):
    layout = mixed_folder
    inputs, work, model, summary = run_with_stand_in(layout, detector)
    assert [n for n, _ in inputs.images] == [3, 7, 8, 10, 11] and inputs.ignored == ['readme.txt']
    assert summary.parsed == 3 and model.batches == [2, 1]
    skipped = pd.read_csv(layout.segmentation_skipped_csv)
    assert list(skipped.columns) == ['img_no', 'reason'] and skipped['img_no'].tolist() == [10, 11]
    assert skipped['reason'][0] == NO_FACE and skipped['reason'][1].startswith('unreadable image')
    assert '/' not in skipped['reason'][1]  # no paths in written files

    # 000007 is the drawn face: MTCNN crop (24, 6, 206, 224), Pillow bicubic, then the truncated face.png.
    drawn = Image.fromarray(facexformer_ref['drawn_face_uint8'].numpy())
    crop = resized_crop(drawn, (24, 6, 206, 224))
    face = read_rgb_png(layout.face_crop(7))
    assert np.array_equal(face, face_png_pixels(normalize(crop))[0])
    class_map = read_map(layout.parsing_map(7))
    assert np.array_equal(class_map, stand_in_map(crop)) and len(np.unique(class_map)) > 3
    assert np.array_equal(read_rgb_png(layout.parsing_visualization(7)), visualization(face, class_map))
    # RGBA is parsed as its RGB content
    assert files_of(layout.segmentation_dir)['face_000008.png'] == layout.face_crop(7).read_bytes()

    # Rerun: nothing pending (the skipped images are settled), nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in layout.segmentation_dir.iterdir()}
    again = plan_work(layout, list_input_images(layout.filtered_dir), STAND_IN_SETTINGS)
    assert again.pending == [] and again.finished == 3 and sorted(again.settled_skips) == [10, 11]
    # A lost output is redone, a replaced skipped image is retried, and the other results stay.
    layout.parsing_map(3).unlink()
    Image.fromarray(facexformer_ref['drawn_face_uint8'].numpy()).save(layout.filtered_image(10))
    later = max(before.values()) + 10**9
    os.utime(layout.filtered_image(10), ns=(later, later))
    _, work, model, summary = run_with_stand_in(layout, detector)
    assert [n for n, _ in work.pending] == [3, 10] and summary.parsed == 2 and not summary.skipped
    assert pd.read_csv(layout.segmentation_skipped_csv)['img_no'].tolist() == [11]
    assert layout.face_crop(7).stat().st_mtime_ns == before[layout.face_crop(7)]


def test_visualization_blends_half_and_half():
    face = np.full((224, 224, 3), 100, np.uint8)
    class_map = np.zeros((224, 224), np.uint8)
    class_map[:, 112:] = 10
    blend = visualization(face, class_map)
    assert blend[0, 0].tolist() == [50, 50, 50]
    assert blend[0, 200].tolist() == [178, 50, 101]  # (100 + (255, 0, 102)) / 2, rounded as OpenCV does
    assert CLASS_COLOURS.shape == (11, 3)


def test_prefetching_keeps_order_and_errors():
    assert list(_prefetched(iter(range(5)), enabled=True)) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise ValueError('boom')

    with pytest.raises(ValueError, match='boom'):
        list(_prefetched(failing(), enabled=True))


def test_input_listing_rejects_empty_and_ambiguous_folders(tmp_path):
    from ohlora.errors import PipelineError

    with pytest.raises(PipelineError, match='no such folder'):
        list_input_images(tmp_path / 'missing')
    (tmp_path / 'notes.txt').write_text('x')
    with pytest.raises(PipelineError, match=r'no NNNNNN.jpg images \(it holds 1 other files, e.g. notes.txt\)'):
        list_input_images(tmp_path)
    noise_image().save(tmp_path / '000004.jpg')
    noise_image().save(tmp_path / '000004.png')
    with pytest.raises(PipelineError, match='two files for image 4'):
        list_input_images(tmp_path)


# --- the script with a checkpoint of the official layout (synthetic weights) ----------------------------

def test_script_end_to_end_with_the_official_checkpoint_layout(tmp_path, synthetic_facexformer, facexformer_ref,
                                                               facexformer_dir, capsys):
    clear = facexformer_ref['parsing_clear'][1].numpy()  # away from near-ties the argmax must agree (README)
    layout = Layout(tmp_path / 'root')
    folder = layout.filtered_dir
    folder.mkdir(parents=True)
    shutil.copy(facexformer_dir / 'astronaut.png', folder / '000001.png')
    Image.open(facexformer_dir / 'astronaut.png').convert('RGBA').save(folder / '000002.png')
    Image.open(facexformer_dir / 'astronaut.png').convert('L').save(folder / '000004.jpg')
    drawn_on_canvas(facexformer_dir).save(folder / '000005.jpg', quality=95)
    noise_image().save(folder / '000009.jpg')
    args = ['--weights', synthetic_facexformer, '--device', 'cpu', '--no-progress', '--batch-size', 2]
    assert run_script(SCRIPT, *args, '--root', layout.root) == 0
    assert 'parsed 4 images' in capsys.readouterr().out

    # The photo: upstream's face.png byte-for-byte in pixels, the reference parsing away from near-ties.
    assert np.array_equal(read_rgb_png(layout.face_crop(1)), read_rgb_png(facexformer_dir / 'face_astronaut.png'))
    photo_map = read_map(layout.parsing_map(1))
    assert photo_map.max() == 10
    assert np.array_equal(photo_map[clear], facexformer_ref['parsing'][1].numpy()[clear])
    assert np.array_equal(read_rgb_png(layout.face_crop(2)), read_rgb_png(layout.face_crop(1)))  # RGBA
    grey = read_rgb_png(layout.face_crop(4)).astype(int)
    assert np.abs(grey - grey[:, :, :1]).max() <= 1  # grey in, grey out (up to the truncation)
    assert pd.read_csv(layout.segmentation_skipped_csv).values.tolist() == [[9, NO_FACE]]
    meta = layout.segmentation_meta.read_text()
    assert '"weights_file": "model.pt"' in meta and str(tmp_path) not in meta

    # Resume: nothing to do, nothing touched. Batch size 1: the same maps away from near-ties.
    before = files_of(layout.segmentation_dir)
    assert run_script(SCRIPT, *args, '--root', layout.root) == 0
    assert 'nothing to do' in capsys.readouterr().out and files_of(layout.segmentation_dir) == before
    other = Layout(tmp_path / 'other')
    shutil.copytree(folder, other.filtered_dir)
    assert run_script(SCRIPT, '--weights', synthetic_facexformer, '--no-progress', '--batch-size', 1,
                      '--root', other.root) == 0
    for n in (1, 2, 4, 5):
        assert other.face_crop(n).read_bytes() == layout.face_crop(n).read_bytes()
        differs = read_map(other.parsing_map(n)) != read_map(layout.parsing_map(n))
        assert differs.sum() <= 3
    assert not (read_map(other.parsing_map(1)) != photo_map)[clear].any()


def test_script_bad_input_fails_in_one_line_and_destroys_nothing(tmp_path, reference_dir, capsys):
    layout = Layout(tmp_path)
    assert run_script(SCRIPT, '--root', tmp_path) == 2
    assert 'no such folder' in capsys.readouterr().err
    layout.filtered_dir.mkdir(parents=True)
    (layout.filtered_dir / 'Thumbs.db').write_bytes(b'\0')
    assert run_script(SCRIPT, '--root', tmp_path) == 2
    assert 'holds no NNNNNN.jpg images' in capsys.readouterr().err

    noise_image().save(layout.filtered_image(0))
    layout.segmentation_dir.mkdir(parents=True)
    layout.parsing_map(0).write_bytes(b'earlier result')
    corrupt = tmp_path / 'corrupt.pt'  # a checkpoint cut short, as by an interrupted download
    torch.save({'state_dict_backbone': {'linear_fuse.weight': torch.zeros(256, 1024, 1, 1)}}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:5000])
    kept = files_of(tmp_path)
    for weights, message in [(reference_dir / 'genforce' / 'tiny_ckpt.pth', "no 'state_dict_backbone' entry"),
                             (corrupt, 'truncated or corrupt'),
                             (tmp_path / 'missing.pt', 'no such file'),
                             (None, 'downloads are switched off')]:
        argv = ['--root', tmp_path, '--device', 'cpu'] + (['--weights', weights] if weights else [])
        assert run_script(SCRIPT, *argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count('\n') == 1
    assert files_of(tmp_path) == kept


def test_script_help_has_examples(capsys):
    assert run_script(SCRIPT, '--help') == 0
    out = capsys.readouterr().out
    assert 'examples:' in out and all(opt in out for opt in ('--weights', '--batch-size', '--device', '--compat'))
