"""The attribute-control evaluation: known answers through pluggable generators and measurers, the parsing path
on drawn faces, resume and refusal, identity, shares, the published-v3 path end to end, bad input."""
import itertools
import json
import re

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ohlora.errors import PipelineError
from ohlora.layout import PROPERTY_NAMES, SCORE_COLUMNS, AttributeControlFolder, Layout
from script_runner import files_of, run_script
from segmentation.face_detection import FaceBox
from segmentation.face_input import IMAGENET_MEAN, IMAGENET_STD
from segmentation.parsing_measurer import ParsingMeasurer
from segmentation.score_normalization import ColumnStats
from stylegan.postprocess import to_uint8
from stylegan_modified import generator_registry
from stylegan_modified.attribute_metrics import V3_TEST_GRID
from stylegan_modified.evaluation_figures import compute_figures
from stylegan_modified.generator_registry import GeneratorEntry, LoadedGenerator
from stylegan_modified.evaluation_inputs import parse_grid, read_z_rows, requested_values, seeded_z
from stylegan_modified.evaluation_run import EvaluationInputs, evaluate
from stylegan_modified.face_identity import FaceEmbedder, identity_scores, load_face_embedder, new_inception_resnet
from stylegan_modified.gender_quality_judge import EnsembleJudge, load_judge

SCRIPT = 'evaluate_attribute_control.py'
SCALE = 6.0  # the pixel generator draws value v as the grey level of v / SCALE in [-1, 1]
BLOCK = 8    # one flat JPEG block per attribute, so the JPEG round trip keeps its level


# --- stand-ins: a generator that draws the requested values, a measurer that reads them back -------------------

class PixelGenerator:
    """Each of the seven values (after optional leakage) as the grey level of its own 8x8 block."""
    score_algorithm = 2
    trained_attributes = PROPERTY_NAMES
    device = torch.device('cpu')

    def __init__(self, ignore_label=False, mouth_to_pose=0.0, size=32, name='pixels', z_dim=4):
        self.ignore_label, self.mouth_to_pose, self.size = ignore_label, mouth_to_pose, size
        self.name, self.z_dim = name, z_dim
        self.drawn = 0

    def images(self, z, values):
        self.drawn += len(z)
        values = values.double().clone()
        if self.ignore_label:  # what the label asks is ignored; the image depends on z only
            values = z[:, :1].double().repeat(1, 7).tanh()
        values[:, 4] += self.mouth_to_pose * values[:, 3]
        images = torch.zeros(len(z), 3, self.size, self.size, dtype=torch.float64)
        for k in range(7):
            row, col = divmod(k, 4)
            rows, cols = slice(row * BLOCK, (row + 1) * BLOCK), slice(col * BLOCK, (col + 1) * BLOCK)
            images[:, :, rows, cols] = (values[:, k] / SCALE).view(-1, 1, 1, 1)
        return images.float()


class ReadBack:
    name, algorithm, image_size = 'read-back', 2, None

    def __init__(self, scale=SCALE, unmeasured=None):
        self.scale, self.unmeasured, self.calls = scale, unmeasured, 0

    def settings(self):
        return {'measure': self.name, 'scale': self.scale}

    def measure(self, images):
        self.calls += len(images)
        grey = images.astype(np.float64).mean(axis=-1)
        values = np.stack([grey[:, r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK].mean(axis=(1, 2))
                           for r, c in (divmod(k, 4) for k in range(7))], axis=1)
        measured = (values / 127.5 - 1.0) * self.scale
        if self.unmeasured is not None:  # images where "no face was found"
            measured[self.unmeasured(images)] = np.nan
        return measured


def inputs_for(generator, measurer=None, num_z=3, grid=None, **extra):
    return EvaluationInputs(generator, measurer or ReadBack(), seeded_z(0, num_z, generator.z_dim),
                            dict(grid or V3_TEST_GRID), z_source='seed 0', **extra)


def run(tmp_path, inputs, name='run', **kwargs):
    return evaluate(inputs, AttributeControlFolder(tmp_path / name), batch_size=kwargs.pop('batch_size', 16),
                    progress=False, **kwargs)


SMALL_GRID = {'eyes': (-1.8, 1.8), 'mouth': (-1.2, 1.6)}


# --- known answers --------------------------------------------------------------------------------------------

def test_a_generator_that_ignores_its_label_has_r_zero_and_fails(tmp_path):
    result = run(tmp_path, inputs_for(PixelGenerator(ignore_label=True)))
    summary = result.summary
    for attribute in ('eyes', 'mouth', 'pose'):
        assert summary['attributes'][attribute]['r']['mean'] == 0.0  # zero variance: r is 0, never NaN
        assert summary['attributes'][attribute]['r']['count'] == 3
    assert summary['pass_rules']['upstream_v3']['passed'] == 0 and summary['pass_rules']['strict']['rate'] == 0.0
    per_z = pd.read_csv(result.folder.per_z_csv)
    assert per_z['r_mouth'].tolist() == [0.0, 0.0, 0.0] and per_z['pass_strict'].tolist() == [0, 0, 0]


def test_a_generator_that_draws_the_requested_values_passes_with_r_one(tmp_path):
    result = run(tmp_path, inputs_for(PixelGenerator()))
    summary, folder = result.summary, result.folder
    assert (result.rendered, result.decoded, result.scored_z, result.reused_z) == (150, 0, 3, 0)
    for attribute in ('eyes', 'mouth', 'pose'):
        figures = summary['attributes'][attribute]
        assert figures['r']['p10'] > 0.9995 and figures['mae']['mean'] < 0.03, (attribute, figures)
    assert summary['pass_rules']['upstream_v3'] | {'thresholds': None} == {
        'checked': ['eyes', 'mouth', 'pose'], 'absolute_r': False, 'passed': 3, 'rate': 1.0, 'thresholds': None}
    assert summary['pass_rules']['strict']['rate'] == 1.0 and summary['best_z']['z_index'] in (0, 1, 2)
    slopes = np.array(summary['leakage']['slope_mean'])  # rows eyes, mouth, pose (grid order: mouth first)
    assert summary['leakage']['requested'] == ['mouth', 'eyes', 'pose']
    expected = np.zeros((3, 7))
    expected[0, 3] = expected[1, 0] = expected[2, 4] = 1.0
    np.testing.assert_allclose(slopes, expected, atol=0.02)

    per_image = pd.read_csv(folder.per_image_csv)
    assert len(per_image) == 150 and per_image['measured'].all()
    # requested values as the grid gives them (not float32's -1.7999999523); mouth outer, pose inner
    assert per_image.loc[:4, 'requested_pose'].tolist() == [-1.2, 0.0, 1.2, 2.4, 3.6]
    assert per_image.loc[0, ['requested_mouth', 'requested_eyes']].tolist() == [-1.2, -1.8]
    assert per_image.loc[149, 'image'] == 'images/z000002/000049.jpg'
    assert np.abs(per_image['measured_pose'] - per_image['requested_pose']).max() < 0.06
    markdown = folder.summary_md.read_text()
    assert '| mouth | 1.000 |' in markdown and 'upstream v3 rule (eyes, mouth, pose): 3/3 z (100.0 %)' in markdown
    assert json.loads(folder.summary_json.read_text())['upstream_reference']
    for name in ('r_mae', 'r_distribution', 'leakage'):
        assert folder.plot(name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    grid_png = cv2.imread(str(folder.sweep_grid(1)))
    assert grid_png.shape[0] > 10 * 128 and grid_png.shape[1] > 5 * 128  # 10 rows (mouth x eyes) x 5 pose


def test_a_mouth_that_also_moves_the_pose_shows_in_the_leakage_matrix(tmp_path):
    summary = run(tmp_path, inputs_for(PixelGenerator(mouth_to_pose=0.5), num_z=2)).summary
    slopes = dict(zip(summary['leakage']['requested'], np.array(summary['leakage']['slope_mean'])))
    pose, mouth, eyes = (PROPERTY_NAMES.index(a) for a in ('pose', 'mouth', 'eyes'))
    assert slopes['mouth'][pose] == pytest.approx(0.5, abs=0.02)  # the leak
    assert slopes['mouth'][mouth] == pytest.approx(1.0, abs=0.02)
    assert slopes['pose'][pose] == pytest.approx(1.0, abs=0.02)
    assert abs(slopes['eyes'][pose]) < 0.02 and abs(slopes['pose'][mouth]) < 0.02
    assert summary['attributes']['pose']['r']['mean'] < 0.99  # r alone hides what moved it


def test_figures_by_hand():
    requested = requested_values({'eyes': (-1.0, 1.0), 'mouth': (0.0, 2.0)})
    measured = np.stack([requested, requested * 0.5, requested[::-1].copy()])
    figures = compute_figures(requested, measured, ('eyes', 'mouth'))
    np.testing.assert_allclose(figures.metrics.r, [[1, 1], [1, 1], [-1, -1]])
    np.testing.assert_allclose(figures.metrics.mae[1], [0.5, 0.5])
    np.testing.assert_allclose(figures.slopes[1, 0, 0], 0.5)
    assert figures.passes['upstream_v3'].tolist() == [True, True, False]  # MAE 0.5 <= 0.6 and 1.0
    assert figures.passes['strict'].tolist() == [True, True, True]        # |r| only
    assert figures.rules['upstream_v3'].thresholds.keys() == {'eyes', 'mouth'}  # pose is not swept


def test_unmeasured_images_are_left_out_of_r_and_mae(tmp_path):
    def no_face(images):  # "no face found" where eyes -1.8 and mouth -1.2 were asked (their blocks are darkest)
        return (images[:, 2, 2, 0] < 100) & (images[:, 2, 26, 0] < 110)
    result = run(tmp_path, inputs_for(PixelGenerator(), ReadBack(unmeasured=no_face), num_z=2, grid=SMALL_GRID))
    per_image = pd.read_csv(result.folder.per_image_csv)
    assert per_image['measured'].tolist() == [0, 1, 1, 1] * 2
    assert per_image.loc[per_image['measured'] == 0, 'measured_eyes'].isna().all()
    summary = result.summary
    assert summary['measured_images'] == 6 and summary['unmeasured_z'] == 0
    assert summary['attributes']['eyes']['r']['mean'] > 0.999 and summary['attributes']['eyes']['mae']['mean'] < 0.03
    assert pd.read_csv(result.folder.per_z_csv)['measured_images'].tolist() == [3, 3]


def test_a_z_without_two_measured_images_fails_and_leaves_the_statistics():
    requested = requested_values(SMALL_GRID)
    measured = np.stack([requested, np.full_like(requested, np.nan)])
    measured[1, 0] = requested[0]
    figures = compute_figures(requested, measured, ('eyes', 'mouth'))
    assert figures.enough.tolist() == [True, False] and figures.passes['strict'].tolist() == [True, False]
    summary = figures.summary()
    assert summary['unmeasured_z'] == 1 and summary['attributes']['eyes']['r']['count'] == 1
    assert np.isnan(figures.slopes[1]).all() and not np.isnan(figures.slopes[0]).any()


# --- the parsing path on drawn faces ---------------------------------------------------------------------------

PALETTE = {0: (0, 0, 0), 1: (255, 255, 255), 4: (255, 0, 0), 5: (0, 255, 0), 6: (0, 0, 255), 7: (255, 255, 0),
           8: (0, 255, 255), 9: (255, 0, 255), 10: (128, 128, 128)}  # class -> colour, far apart
LEVEL_CLASS = np.zeros(27, dtype=np.int64)  # per channel 0 / 128 / 255 -> class
for cls, colour in PALETTE.items():
    r, g, b = (round(c / 127.5) for c in colour)
    LEVEL_CLASS[r * 9 + g * 3 + b] = cls


class DrawnFaces:
    """256x256 cartoon faces: eye half-height 8 + 3 eyes, inner-mouth share (14 + 4 mouth) / 40 of a mouth of fixed
    height, eye-line slope pose / 8: whole pixels for whole values, so the scores are linear in the values."""
    name, z_dim, score_algorithm, trained_attributes = 'drawn', 2, 2, ('eyes', 'mouth', 'pose')
    device = torch.device('cpu')

    def images(self, z, values):
        out = []
        for v in values.double().numpy():
            image = np.zeros((256, 256, 3), np.uint8)
            cv2.ellipse(image, (128, 135), (90, 115), 0, 0, 360, PALETTE[1], -1)
            cv2.rectangle(image, (30, 0), (226, 30), PALETTE[10], -1)
            half = int(round(8 + 3 * v[0]))
            cv2.ellipse(image, (88, 100), (22, half), 0, 0, 360, PALETTE[4], -1)
            cv2.ellipse(image, (168, 100 + int(round(10 * v[4]))), (22, half), 0, 0, 360, PALETTE[5], -1)
            cv2.rectangle(image, (120, 125), (136, 150), PALETTE[6], -1)
            inner = int(round(14 + 4 * v[3]))  # rows of inner mouth out of 40; the lips share the rest
            upper = (40 - inner) // 2
            cv2.rectangle(image, (98, 175), (158, 175 + upper - 1), PALETTE[7], -1)
            cv2.rectangle(image, (98, 175 + upper), (158, 175 + upper + inner - 1), PALETTE[8], -1)
            cv2.rectangle(image, (98, 175 + upper + inner), (158, 214), PALETTE[9], -1)
            out.append(image)
        return (torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).double() / 127.5 - 1).float()


class FixedBox:
    min_side = 20  # MTCNN's min_face_size, as FaceDetector exposes it

    def detect(self, image):
        box = (16.0, 16.0, 240.0, 240.0)
        return FaceBox(box, 1.0, box, (16, 16, 240, 240))


class ColourParser:
    """One-hot logits of the palette class nearest to each pixel of the (de-normalised) crop."""
    def segment(self, x):
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        levels = ((x * std + mean) * 2).round().clamp(0, 2).long()
        classes = torch.from_numpy(LEVEL_CLASS)[levels[:, 0] * 9 + levels[:, 1] * 3 + levels[:, 2]]
        return nn.functional.one_hot(classes, 11).permute(0, 3, 1, 2).float()


def fitted_stats(measurer_factory, generator):
    """Statistics that map the raw scores of value 0 to 0 and of value 1 to 1 (what stage 4 would learn)."""
    unit = {c: ColumnStats(0.0, 1.0, 2) for c in SCORE_COLUMNS}
    values = torch.zeros(2, 7)
    values[1] = 1.0
    images = to_uint8(generator.images(None, values))
    raw = measurer_factory(unit).measure(np.stack([cv2.imdecode(cv2.imencode('.jpg', i[:, :, ::-1])[1], 1)[:, :, ::-1]
                                                   for i in images]))
    return {c: ColumnStats(float(raw[0, k]), float(abs(raw[1, k] - raw[0, k])) or 1.0, 2)
            for k, c in enumerate(SCORE_COLUMNS)}


def test_drawn_faces_through_the_parsing_path_give_r_one(tmp_path):
    generator = DrawnFaces()
    factory = lambda stats: ParsingMeasurer(ColourParser(), FixedBox(), 2, stats)  # noqa: E731
    measurer = factory(fitted_stats(factory, generator))
    grid = {'eyes': (-1.0, 0.0, 1.0), 'mouth': (-1.0, 0.0, 1.0, 2.0), 'pose': (-1.0, 1.0, 2.0)}
    summary = run(tmp_path, inputs_for(generator, measurer, num_z=1, grid=grid)).summary
    for attribute in grid:
        figures = summary['attributes'][attribute]
        assert figures['r']['mean'] > 0.999 and figures['mae']['mean'] < 0.05, (attribute, figures)
    assert summary['pass_rules']['upstream_v3']['passed'] == 1
    slopes = np.array(summary['leakage']['slope_mean'])
    assert np.abs(slopes[:, [1, 2, 5, 6]]).max() < 1e-9  # hair and background never move


@pytest.mark.parametrize('algorithm', [1, 2])
def test_in_memory_parsing_equals_stages_3_and_4_on_files(tmp_path, algorithm):
    from segmentation.parsing import run_stage
    from segmentation.property_scores import image_inputs, score_image

    values = torch.zeros(1, 7)
    values[0, [0, 3, 4]] = torch.tensor([1.0, 0.5, 1.0])
    rgb = to_uint8(DrawnFaces().images(None, values))[0]
    layout = Layout(tmp_path)
    layout.filtered_dir.mkdir(parents=True)
    cv2.imwrite(str(layout.filtered_image(3)), rgb[:, :, ::-1])  # as stage 1 writes it
    run_stage(layout, ColourParser(), FixedBox(), [(3, layout.filtered_image(3))], 4, torch.device('cpu'),
              progress=False)
    on_files = score_image(image_inputs(layout, [3])[3], algorithm).values
    unit = {c: ColumnStats(0.0, 1.0, 2) for c in SCORE_COLUMNS}
    decoded = cv2.imread(str(layout.filtered_image(3)))[:, :, ::-1]
    in_memory = ParsingMeasurer(ColourParser(), FixedBox(), algorithm, unit).measure(decoded[None])[0]
    np.testing.assert_allclose(in_memory, np.round(on_files, 4), atol=1e-12)


def test_no_face_gives_a_row_of_nan():
    class NoFaceOnDark(FixedBox):
        def detect(self, image):
            return None if np.asarray(image).mean() < 1 else super().detect(image)
    unit = {c: ColumnStats(0.0, 1.0, 2) for c in SCORE_COLUMNS}
    images = np.stack([to_uint8(DrawnFaces().images(None, torch.zeros(1, 7)))[0], np.zeros((256, 256, 3), np.uint8)])
    measured = ParsingMeasurer(ColourParser(), NoFaceOnDark(), 2, unit).measure(images)
    assert np.isfinite(measured[0]).all() and np.isnan(measured[1]).all()



def test_a_detector_failure_or_a_too_small_image_is_one_unmeasured_row(caplog):
    """Stage 3's guards: MTCNN raising on one image stopped the whole evaluation with a traceback, and an image
    smaller than MTCNN's min_face_size made it fail inside torch.cat."""
    class FailsOnDark(FixedBox):
        calls = 0

        def detect(self, image):
            FailsOnDark.calls += 1
            if np.asarray(image).mean() < 1:
                raise RuntimeError('torch.cat(): expected a non-empty list of Tensors')
            return super().detect(image)
    unit = {c: ColumnStats(0.0, 1.0, 2) for c in SCORE_COLUMNS}
    face = to_uint8(DrawnFaces().images(None, torch.zeros(1, 7)))[0]
    measurer = ParsingMeasurer(ColourParser(), FailsOnDark(), 2, unit)
    measured = measurer.measure(np.stack([face, np.zeros_like(face), face]))
    assert np.isfinite(measured[[0, 2]]).all() and np.isnan(measured[1]).all()
    np.testing.assert_array_equal(measured[0], measured[2])
    FailsOnDark.calls = 0
    with caplog.at_level('WARNING'):
        small = measurer.measure(np.full((2, 16, 16, 3), 128, np.uint8))
    assert np.isnan(small).all() and FailsOnDark.calls == 0  # never handed to the detector
    assert 'images of 16x16 pixels are too small for face detection (at least 20x20)' in caplog.text


# --- resume and refusal ---------------------------------------------------------------------------------------

def test_rerun_skips_everything_resumes_parts_and_refuses_other_settings(tmp_path):
    generator, measurer = PixelGenerator(), ReadBack()
    inputs = inputs_for(generator, measurer, num_z=2, grid=SMALL_GRID)
    first = run(tmp_path, inputs, batch_size=3)
    folder = first.folder
    before = files_of(folder.folder)
    generator.drawn = measurer.calls = 0

    again = run(tmp_path, inputs, batch_size=5)  # another batch size: same files
    assert (again.rendered, again.decoded, again.scored_z, again.reused_z) == (0, 0, 0, 2)
    assert generator.drawn == 0 and measurer.calls == 0 and files_of(folder.folder) == before

    folder.z_scores(1).unlink()  # scores lost: the images are read back, not drawn again
    resumed = run(tmp_path, inputs)
    assert (resumed.rendered, resumed.decoded, resumed.scored_z) == (0, 4, 1) and files_of(folder.folder) == before
    folder.z_scores(0).unlink()
    folder.image(0, 2).unlink()
    folder.sweep_grid(1).unlink()
    resumed = run(tmp_path, inputs)
    assert (resumed.rendered, resumed.decoded) == (1, 3) and files_of(folder.folder) == before

    more = run(tmp_path, inputs_for(generator, measurer, num_z=3, grid=SMALL_GRID))  # more z extend the folder
    assert (more.rendered, more.reused_z) == (4, 2) and more.summary['num_z'] == 3
    bigger = files_of(folder.folder)

    def refused(changed_inputs, match):
        with pytest.raises(PipelineError, match=match):
            run(tmp_path, changed_inputs)
        assert files_of(folder.folder) == bigger

    refused(inputs_for(generator, measurer, num_z=2, grid={'eyes': (-1.8, 1.8), 'mouth': (-1.2, 1.0)}),
            r'other settings \(grid ')
    refused(inputs_for(generator, ReadBack(scale=5.0), num_z=2, grid=SMALL_GRID), r'measure.scale 6.0 -> 5.0')
    other_z = inputs_for(generator, measurer, num_z=2, grid=SMALL_GRID)
    other_z.z = seeded_z(1, 2, 4)
    other_z.z_source = 'seed 1'
    refused(other_z, r'another z 0 \(that folder: seed 0; this run: seed 1\)')
    folder.settings_json.write_text('[]')
    bigger = files_of(folder.folder)
    refused(inputs, 'is not a settings record of this evaluation')
    folder.settings_json.unlink()
    bigger = files_of(folder.folder)
    refused(inputs, 'holds evaluation files but no evaluation_settings.json')


def test_a_measurer_that_needs_another_image_size_is_refused_before_writing(tmp_path):
    measurer = ReadBack()
    measurer.image_size = (256, 256)
    with pytest.raises(PipelineError, match='draws 32x32 images, but the read-back measurer reads 256x256'):
        run(tmp_path, inputs_for(PixelGenerator(), measurer, num_z=1, grid=SMALL_GRID))
    assert not (tmp_path / 'run').exists()



class NaNGenerator(PixelGenerator):
    """A generator with broken (NaN) weights: NaN pixels for the labels ``broken`` picks (default: all)."""

    def __init__(self, broken=lambda values: torch.ones(len(values), dtype=torch.bool), **kwargs):
        super().__init__(**kwargs)
        self.broken = broken

    def images(self, z, values):
        images = super().images(z, values)
        images[self.broken(values)] = float('nan')
        return images


def test_nan_pixels_stop_the_run_in_one_line_before_they_are_written(tmp_path):
    """Without the check, NaN images became black JPEGs, were measured and reported with exit status 0."""
    with pytest.raises(PipelineError, match=r'the generator gave NaN or infinite pixels for image z 0 label 0 '
                                            r'\(1 of 1 in its batch\); nothing of that batch was written; check '
                                            r"the generator's weights"):
        run(tmp_path, inputs_for(NaNGenerator(), num_z=2, grid=SMALL_GRID))
    assert not (tmp_path / 'run').exists()
    # NaN only where mouth = 1.6: the batch holding z 0's last label stops the run, none of its images is written
    generator = NaNGenerator(lambda values: values[:, 3] > 1.0)
    with pytest.raises(PipelineError, match=r'for image z 0 label 1 \(2 of 4 in its batch\)'):
        run(tmp_path, inputs_for(generator, num_z=2, grid=SMALL_GRID), batch_size=4)
    folder = AttributeControlFolder(tmp_path / 'run')
    assert not list(folder.folder.rglob('*.jpg')) and not folder.scores_dir.exists()


def test_values_beyond_float32_are_refused_before_anything_runs(tmp_path, tiny_files, capsys, monkeypatch):
    """A grid value or a z beyond float32 became inf in the generator's input: NaN images, exit status 0."""
    def fails(*argv, match):
        capsys.readouterr()
        assert run_script(SCRIPT, *argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and '\n' not in err and match in err, err
        assert not (tmp_path / 'root').exists()

    base = tiny_args(tiny_files, tmp_path / 'root')
    fails(*base[:-2], '--grid', 'eyes=-1e39,1e39', match='--grid eyes=-1e39,1e39: must be in [-1000, 1000], got -1e+39')
    fails(*base[:-2], '--grid', 'eyes=0,2000', match='--grid eyes=0,2000: must be in [-1000, 1000], got 2000')
    pd.DataFrame([[0.5] * 32, [1e39] * 32], columns=[str(k) for k in range(32)]).to_csv(tmp_path / 'huge.csv',
                                                                                        index=False)
    fails(*base[:-4], *base[-2:], '--z-csv', tmp_path / 'huge.csv',
          match='huge.csv has NaN or infinite values, or values beyond float32 (z vector CSV, data row 1)')
    with pytest.raises(PipelineError, match='values beyond float32'):
        read_z_rows(tmp_path / 'huge.csv', 32)
    # a generator with NaN weights, through the script: one line, exit status 2, nothing written
    monkeypatch.setitem(generator_registry.GENERATORS, 'nan', GeneratorEntry(
        lambda layout, weights, device, directions=None: LoadedGenerator(NaNGenerator(size=256), ()), 'NaN'))
    fails('--model', 'nan', '--property-cnn', tiny_files / 'property_cnn.pth', '--root', tmp_path / 'root',
          '--no-progress', '--num', 1, '--grid', 'mouth=0,1', '--device', 'cpu', '--no-identity', '--no-shares',
          match='the generator gave NaN or infinite pixels for image z 0 label 0')



@pytest.mark.parametrize('blocker, message', [
    ('scores', 'cannot write into {folder}/scores: it is a file'),
    ('images', 'cannot write into {folder}/images/z000000: {folder}/images is a file'),
    ('summary.md/', 'cannot write {folder}/summary.md: it is a folder; move it away'),
    ('evaluation_settings.json/', 'cannot write {folder}/evaluation_settings.json: it is a folder'),
    ('plots/leakage.png/', 'cannot write {folder}/plots/leakage.png: it is a folder'),
    ('images/z000001/000003.jpg/', 'cannot write {folder}/images/z000001/000003.jpg: it is a folder'),
])
def test_every_output_path_is_checked_before_anything_is_written(tmp_path, blocker, message):
    """A file where a folder goes (or a folder where a file goes) stopped the run only when that path was written,
    after the images, scores and records before it."""
    folder = tmp_path / 'run'
    target = folder / blocker.rstrip('/')
    if blocker.endswith('/'):
        (target / 'keep').mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text('x')
    before = files_of(folder)
    with pytest.raises(PipelineError, match=re.escape(message.format(folder=folder))):
        run(tmp_path, inputs_for(PixelGenerator(), num_z=2, grid=SMALL_GRID))
    assert files_of(folder) == before and sorted(p.name for p in folder.iterdir()) == [blocker.split('/')[0]]


# --- identity and shares --------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def random_embedder_file(tmp_path_factory):
    """A random InceptionResnetV1 saved like the VGGFace2 file (with its unused classifier)."""
    torch.manual_seed(3)
    model = new_inception_resnet()
    state = {**model.state_dict(), 'logits.weight': torch.randn(8631, 512), 'logits.bias': torch.zeros(8631)}
    path = tmp_path_factory.mktemp('identity') / 'vggface2_stand_in.pt'
    torch.save(state, path)
    return path


class PatchEmbedding(nn.Module):
    """A stand-in face net that sees pixel differences (random InceptionResnetV1 embeddings barely vary)."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 16, stride=16)

    def forward(self, x):
        return self.conv(x).flatten(1)


def test_identity_is_one_for_identical_images_and_lower_otherwise(tmp_path, random_embedder_file):
    embedder = load_face_embedder(random_embedder_file)  # the real network, random weights
    same = run(tmp_path, inputs_for(PixelGenerator(ignore_label=True), num_z=2, grid=SMALL_GRID, embedder=embedder),
               name='same').summary['identity']
    assert same['mean'] == pytest.approx(1.0, abs=1e-6) and same['count'] == 2
    varied = run(tmp_path, inputs_for(PixelGenerator(), num_z=2, grid={'mouth': (-1.2, 1.6), 'pose': (-1.2, 3.6)},
                                      embedder=FaceEmbedder(PatchEmbedding())), name='varied')
    assert 0 < varied.summary['identity']['mean'] < 0.999
    per_image = pd.read_csv(varied.folder.per_image_csv)
    per_z = pd.read_csv(varied.folder.per_z_csv)
    np.testing.assert_allclose(per_image.groupby('z_index')['identity'].mean(), per_z['identity'])


def test_identity_scores_by_hand_and_bad_files(tmp_path):
    np.testing.assert_allclose(identity_scores(np.eye(3)), [0, 0, 0])
    np.testing.assert_allclose(identity_scores(np.array([[1.0, 0], [1, 0], [0, 1]])), [0.5, 0.5, 0.0])
    assert np.isnan(identity_scores(np.ones((1, 4)))).all()
    model = new_inception_resnet()
    broken = model.state_dict()
    broken['last_linear.weight'] = torch.full_like(broken['last_linear.weight'], float('nan'))
    torch.save(broken, tmp_path / 'nan.pt')
    with pytest.raises(PipelineError, match='NaN or infinite values'):
        load_face_embedder(tmp_path / 'nan.pt')
    torch.save({'conv1.0.weight': torch.zeros(3)}, tmp_path / 'other.pt')
    with pytest.raises(PipelineError, match='does not fit the facenet-pytorch InceptionResnetV1'):
        load_face_embedder(tmp_path / 'other.pt')


class Constant(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([p]))

    def forward(self, x):
        return self.p.expand(x.shape[0], 1)


def test_shares_of_images_judged_female_and_good(tmp_path):
    # gender mean 0.7 (>= 0.7: female, the threshold is inclusive); quality mean 0.5 (< 0.9: not good)
    judge = EnsembleJudge({'gender': [Constant(p) for p in (0.6, 0.8, 0.7, 0.75, 0.65)],
                           'quality': [Constant(0.5)] * 5})
    judge.image_size = None
    result = run(tmp_path, inputs_for(PixelGenerator(), num_z=2, grid=SMALL_GRID, judge=judge))
    shares = result.summary['shares']
    assert (shares['female'], shares['good_quality']) == (1.0, 0.0)
    assert shares['thresholds'] == {'female': 0.7, 'good_quality': 0.9}
    per_image = pd.read_csv(result.folder.per_image_csv)
    assert per_image['gender'].eq(0.7).all() and per_image['quality'].eq(0.5).all()

    sized = EnsembleJudge({'gender': [Constant(0.9)], 'quality': [Constant(0.9)]})  # reads 256x256 only
    left = run(tmp_path, inputs_for(PixelGenerator(), num_z=1, grid=SMALL_GRID, judge=sized), name='sized').summary
    assert left['shares'] is None and left['left_out'] == [
        'female and good-quality shares: the stage-2 CNNs read 256x256 images, the pixels generator draws 32x32']


def test_judge_weights_offline_are_left_out_but_a_wrong_folder_is_an_error(tmp_path):
    judge, reason = load_judge(Layout(tmp_path), None, torch.device('cpu'))
    assert judge is None and 'pass --cnn-weights DIR' in reason and '\n' not in reason
    with pytest.raises(PipelineError, match='--cnn-weights .*: no such folder'):
        load_judge(Layout(tmp_path), tmp_path / 'nowhere', torch.device('cpu'))
    (tmp_path / 'some').mkdir()
    with pytest.raises(PipelineError, match='--cnn-weights .* has no gender_model_0.pt'):
        load_judge(Layout(tmp_path), tmp_path / 'some', torch.device('cpu'))


# --- inputs -----------------------------------------------------------------------------------------------------

def test_grid_and_z_inputs(tmp_path):
    assert parse_grid(None) == V3_TEST_GRID and len(requested_values(parse_grid(None))) == 50
    grid = parse_grid(['pose=-1,0.5', 'hair-color=0', 'eyes=1,2,3'])
    assert grid == {'pose': (-1.0, 0.5), 'hair_color': (0.0,), 'eyes': (1.0, 2.0, 3.0)}
    assert requested_values(grid)[:3, [4, 1, 0]].tolist() == [[-1, 0, 1], [-1, 0, 2], [-1, 0, 3]]
    for specs, match in ((['nose=1,2'], 'unknown attribute'), (['eyes=1,1'], 'lists a value twice'),
                         (['eyes'], 'is not ATTR=V1,V2'), (['eyes=1,x'], "'x' is not a number"),
                         (['eyes=1,inf'], 'not a finite number'), (['eyes=1', 'mouth=0'], 'varies no attribute'),
                         (['eyes=1,2', 'eyes=3,4'], 'names eyes twice')):
        with pytest.raises(PipelineError, match=match):
            parse_grid(specs)
    a, b = seeded_z(7, 3, 5), seeded_z(7, 5, 5)
    assert a.dtype == np.float32 and np.array_equal(a, b[:3]) and not np.array_equal(a[0], a[1])
    rows = np.random.default_rng(0).standard_normal((3, 5))
    pd.DataFrame(rows, columns=[str(k) for k in range(5)]).to_csv(tmp_path / 'z.csv', index=False)
    np.testing.assert_array_equal(read_z_rows(tmp_path / 'z.csv', 5), rows.astype(np.float32))
    with pytest.raises(PipelineError, match='holds z of 5 values, but the generator takes z of 4'):
        read_z_rows(tmp_path / 'z.csv', 4)



def test_evaluation_z_are_not_the_z_of_stage_1_or_the_direction_samples():
    """With stream 0 the evaluation's z_i were stage 1's and the direction sampler's z_i: --model directions was
    partly evaluated on its own training samples."""
    from stylegan.sampling import MIX_Z_STREAM, Z_STREAM, sampled_latent
    for seed in (0, 3):
        evaluation = torch.from_numpy(seeded_z(seed, 100, 16))
        for stream in (Z_STREAM, MIX_Z_STREAM):
            sampled = torch.stack([sampled_latent(seed, i, 16, stream) for i in range(200)])
            assert torch.cdist(evaluation, sampled).min() > 1.0  # no z shared (equal ones would be at distance 0)


# --- the script -------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_files(reference_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp('evaluation_inputs')
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    for name in ('v1_generator', 'v3_generator'):
        torch.save(tiny['state_dicts'][name], folder / f'{name}.pth')
    from stylegan_modified.property_score_cnn import PropertyScoreCNN
    torch.manual_seed(1)
    torch.save(PropertyScoreCNN().state_dict(), folder / 'property_cnn.pth')  # full size, random
    return folder


def tiny_args(files, root, *extra):
    return ['--weights', files / 'v3_generator.pth', '--property-cnn', files / 'property_cnn.pth', '--root', root,
            '--device', 'cpu', '--no-progress', '--num', 1, '--grid', 'eyes=-1.8,1.8', *extra]


def test_script_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_files, capsys):
    root = tmp_path / 'root'
    assert run_script(SCRIPT, *tiny_args(tiny_files, root)) == 0
    before = files_of(root)

    def fails(*argv, match):
        capsys.readouterr()
        assert run_script(SCRIPT, *argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and '\n' not in err and match in err, err
        assert files_of(root) == before

    base = tiny_args(tiny_files, root)
    fails(*base, '--model', 'v9', match="argument --model: invalid choice: 'v9'")
    fails(*base[:-4], '--num', '0', match='argument --num: must be at least 1, got 0')
    fails(*base, '--model', 'v1',
          match='is an Oh-LoRA v3 generator (label_weight 7x24, z width 32), not the Oh-LoRA v1')
    fails(*base[2:], '--weights', tiny_files / 'v1_generator.pth', match='it loads with --model v1 (or v2)')
    fails(*base, '--model', 'v2', '--weights', tiny_files / 'v3_generator.pth', match='not the Oh-LoRA v2 generator')
    fails('--model', 'v2', '--root', root, match='train the v2 generator with run_stylegan_fine_tuning_v2.py --train-generator')
    fails(*base, '--measure', 'parsing', '--property-cnn', 'x.pth', match='--property-cnn only applies')
    fails(*base[:2], *base[4:], '--measure', 'parsing', match='all_scores_v2_stats.json: no such statistics file')
    fails(*base[:2], *base[4:], '--measure', 'parsing', '--stats', tmp_path / 'none.json',
          match='no such statistics file (--stats)')
    fails(*base, '--algorithm', '1', match='--algorithm only apply to --measure parsing')
    fails(*base, '--z-csv', tmp_path / 'z.csv', match='--num and --z-csv exclude each other')
    fails(*base, '--grid', 'nose=1,2', match='unknown attribute')
    fails(*base[:-2], '--grid', 'eyes=1', match='varies no attribute')
    fails(*base[:2], *base[4:], match='--property-cnn PATH')  # offline, no published property CNN here
    fails(*base[:2], *base[4:], '--property-cnn', tmp_path / 'none.pth', match='--property-cnn')
    fails(*base, '--identity-weights', tmp_path / 'none.pt', match='--identity-weights')
    fails(*base, '--cnn-weights', tmp_path / 'none', match='--cnn-weights')
    fails(*base, '--no-identity', '--identity-weights', 'x.pt', match='exclude each other')
    fails(*base[:-1], 'eyes=-1.8,1.0', match='other settings (grid')
    capsys.readouterr()


def test_script_warns_about_untrained_attributes_and_plugs_in_new_generators(tmp_path, tiny_files, capsys,
                                                                              monkeypatch):
    assert run_script(SCRIPT, *tiny_args(tiny_files, tmp_path / 'a'), '--grid', 'hair_color=0,1') == 0
    captured = capsys.readouterr()
    assert 'warning: --grid hair_color: v3 was never trained on hair_color' in captured.err
    identity_file = Layout(tmp_path / 'a').identity_weights
    assert (f'left out: identity: the face-embedding weights are not at {identity_file} and cannot be downloaded '
            'here; pass --identity-weights PATH\n') in captured.out  # offline: one line, the rest runs

    monkeypatch.setitem(generator_registry.GENERATORS, 'pixels', GeneratorEntry(
        lambda layout, weights, device, directions=None: LoadedGenerator(PixelGenerator(size=256), ()), 'test stand-in'))
    root = tmp_path / 'b'
    assert run_script(SCRIPT, '--model', 'pixels', '--property-cnn', tiny_files / 'property_cnn.pth', '--root', root,
                      '--no-progress', '--num', 1, '--grid', 'mouth=0,1', '--device', 'cpu') == 0
    out = capsys.readouterr().out
    assert '2 images rendered' in out
    assert (Layout(root).attribute_control_dir('pixels', 'property-cnn') / 'summary.json').is_file()


def test_script_help_has_examples(capsys):
    assert run_script(SCRIPT, '--help') == 0
    out = capsys.readouterr().out
    assert 'examples:' in out and '--z-csv stylegan_modified/test_z_vector_0005.csv' in out and '--property-cnn' in out


def test_published_v3_path_end_to_end_on_stand_in_weights(tmp_path, random_embedder_file, capsys):
    """Full-size random StyleGANGeneratorForV3 and PropertyScoreCNN in the published file layout, --num 2."""
    from stylegan_modified.property_score_cnn import PropertyScoreCNN
    from stylegan_modified.stylegan_generator import StyleGANGeneratorForV3

    torch.manual_seed(5)
    layout = Layout(tmp_path / 'root')
    layout.fine_tuned_dir.mkdir(parents=True)
    torch.save(StyleGANGeneratorForV3().state_dict(), layout.fine_tuned('stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth'))
    torch.save(PropertyScoreCNN().state_dict(), layout.fine_tuned('stylegan_gen_fine_tuned_v2_cnn.pth'))
    argv = ['--root', layout.root, '--num', 2, '--grid', 'mouth=-1.2,1.6', '--no-progress',
            '--identity-weights', random_embedder_file, '--device', 'cpu']
    assert run_script(SCRIPT, *argv) == 0
    out = capsys.readouterr().out
    folder = layout.attribute_control_folder('v3', 'property-cnn')
    assert out.startswith('4 images rendered, 0 read back, 2 z measured') and str(folder.folder) in out
    assert 'left out: female and good-quality shares: the stage-2 gender ensemble is not in' in out
    summary = json.loads(folder.summary_json.read_text())
    assert summary['run'] | {'z_source': 'seed 0'} == {'model': 'v3', 'measure': 'property-cnn', 'algorithm': 2,
                                                       'model_score_algorithm': 2, 'z_source': 'seed 0',
                                                       'labels_per_z': 2, 'images': 4}
    assert summary['attributes'].keys() == {'mouth'} and summary['identity']['count'] == 2
    assert -1 <= summary['attributes']['mouth']['r']['mean'] <= 1
    assert summary['pass_rules']['upstream_v3']['checked'] == ['mouth']
    per_image = pd.read_csv(folder.per_image_csv)
    assert len(per_image) == 4 and per_image['measured'].all() and per_image['identity'].between(-1, 1).all()
    assert cv2.imread(str(folder.image(1, 1))).shape == (256, 256, 3)
    record = json.loads(folder.settings_json.read_text())
    assert record['generator']['files'].keys() == {'stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth'}
    before = files_of(folder.folder)
    assert run_script(SCRIPT, *argv) == 0  # a finished rerun reads its records back and writes nothing
    assert capsys.readouterr().out.startswith('0 images rendered, 0 read back, 0 z measured, 2 z already measured')
    assert files_of(folder.folder) == before


def write_stats(path, stats, algorithm=None):
    from ohlora import atomic
    from segmentation.score_normalization import stats_document
    extra = {} if algorithm is None else {'algorithm': algorithm}
    atomic.write_json(path, stats_document(stats, pd.DataFrame(), **extra))


def test_script_measures_by_parsing_with_the_stage_4_statistics(tmp_path, capsys, monkeypatch):
    """--measure parsing through the script: statistics of this root, the parser file, the drawn faces."""
    import segmentation.face_detection
    import segmentation.facexformer

    generator = DrawnFaces()
    monkeypatch.setitem(generator_registry.GENERATORS, 'drawn', GeneratorEntry(
        lambda layout, weights, device, directions=None: LoadedGenerator(generator, ()), 'drawn faces'))
    monkeypatch.setattr(segmentation.facexformer, 'load_facexformer', lambda path, device: ColourParser())
    monkeypatch.setattr(segmentation.face_detection, 'FaceDetector', FixedBox)
    layout = Layout(tmp_path / 'root')
    stats = fitted_stats(lambda s: ParsingMeasurer(ColourParser(), FixedBox(), 2, s), generator)
    parser_file = tmp_path / 'parser.pt'
    parser_file.write_bytes(b'stand-in')
    argv = ['--model', 'drawn', '--measure', 'parsing', '--root', layout.root, '--no-progress', '--num', 1,
            '--grid', 'eyes=-1,1', '--grid', 'mouth=0,2', '--no-identity', '--no-shares', '--device', 'cpu']

    def fails(*extra, match):
        capsys.readouterr()
        assert run_script(SCRIPT, *argv, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and '\n' not in err and match in err, err
        assert not (layout.evaluation_dir).exists()

    fails('--facexformer', parser_file, match='all_scores_v2_stats.json: no such statistics file (this root)')
    layout.property_scores_dir.mkdir(parents=True)
    write_stats(layout.property_scores_stats(2), stats, algorithm=1)
    fails('--facexformer', parser_file, match='holds the statistics of algorithm 1, not of algorithm 2')
    write_stats(layout.property_scores_stats(2), stats)  # no "algorithm": its scale is unknown, refused as stage 4 does
    fails('--facexformer', parser_file, match='does not say which algorithm its statistics belong to (no "algorithm")')
    write_stats(layout.property_scores_stats(2), stats, algorithm=2)
    fails(match='--facexformer PATH')  # offline without the 1.1 GB parser

    assert run_script(SCRIPT, *argv, '--facexformer', parser_file) == 0
    summary = json.loads(layout.attribute_control_folder('drawn', 'parsing-alg2').summary_json.read_text())
    assert summary['run']['measure'] == 'parsing' and summary['pass_rules']['upstream_v3']['passed'] == 1
    assert summary['attributes']['mouth']['r']['mean'] > 0.999 and summary['attributes']['eyes']['mae']['mean'] < 0.05
    record = json.loads(layout.attribute_control_folder('drawn', 'parsing-alg2').settings_json.read_text())
    assert record['measure']['algorithm'] == 2 and len(record['measure']['statistics_sha256']) == 64


@pytest.mark.slow
def test_parsing_with_the_real_networks_end_to_end(tmp_path, reference_dir, capsys, monkeypatch,
                                                   synthetic_facexformer):
    """MTCNN and a FaceXFormer of the official layout (synthetic weights): the reference drawn face, pasted."""
    face = cv2.imread(str(reference_dir / 'facexformer' / 'drawn_face_A.png'))[:, :, ::-1]

    class Pasted(DrawnFaces):
        name = 'pasted'

        def images(self, z, values):
            canvas = np.full((len(z), 256, 256, 3), 200, np.uint8)
            canvas[:, 20:244, 16:240] = face
            return torch.from_numpy(canvas).permute(0, 3, 1, 2).float() / 127.5 - 1

    monkeypatch.setitem(generator_registry.GENERATORS, 'pasted', GeneratorEntry(
        lambda layout, weights, device, directions=None: LoadedGenerator(Pasted(), ()), 'pasted drawn face'))
    layout = Layout(tmp_path / 'root')
    layout.property_scores_dir.mkdir(parents=True)
    write_stats(layout.property_scores_stats(1), {c: ColumnStats(0.0, 1.0, 2) for c in SCORE_COLUMNS}, algorithm=1)
    checkpoint = synthetic_facexformer
    assert run_script(SCRIPT, '--model', 'pasted', '--measure', 'parsing', '--algorithm', '1', '--root', layout.root,
                      '--facexformer', checkpoint, '--num', 1, '--grid', 'mouth=0,1', '--no-identity', '--no-shares',
                      '--no-progress', '--device', 'cpu') == 0
    per_image = pd.read_csv(layout.attribute_control_folder('pasted', 'parsing-alg1').per_image_csv)
    assert per_image['measured'].all()  # MTCNN found the face in both images
    assert per_image[[f'measured_{n}' for n in PROPERTY_NAMES]].nunique().max() == 1  # same pixels, same scores
