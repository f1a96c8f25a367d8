"""The whole pipeline end to end on a small example: every script in order, each reading what the previous one wrote.

The commands are those of docs/small-example.md (a test below checks that the page lists exactly these), run
in-process with ``--root`` a temporary folder, the tiny GenForce checkpoint of tests/data and the inputs that
tests/make_small_example.py builds. Every step asserts the files and values it hands to the next one; a failure
names the step (``stage 3 (run_segmentation.py): …``).

Known answers: the stage-2 nets output constants, so the scores and the filter are known; the stand-in
portraits are drawn stage-4 cases whose parsing maps and upstream scores are in tests/data, so once their known
maps replace the ones stage 3 wrote, stage 4 must give the upstream's scores. The trained models' numbers are
not known in advance: for them the test checks that each file is the one the next step used (SHA-256 in its
records), loads strictly, and reproduces what it wrote (z, images, scores).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import make_small_example as small
from cnn.images import decode_rgb
from ohlora.layout import CODE_ROOT, PROPERTY_NAMES, SCORE_COLUMNS, Layout, V3Outputs, image_name
from ohlora.records import sha256_of
from script_runner import run_script
from segmentation.score_normalization import read_raw_scores
from stylegan.checkpoint import load_generator
from stylegan.postprocess import to_uint8
from stylegan.sampling import sampled_latent
from stylegan_modified.checkpoint import (load_conditional_discriminator, load_conditional_generator,
                                          load_cvae_encoder, load_property_cnn)
from stylegan_modified.directions_file import read_directions
from stylegan_modified.generation import read_z_csv
from stylegan_modified.labels import UPSTREAM_LABEL, label_vector

TINY = 'tests/data/genforce/tiny_ckpt.pth'      # as the page writes it: relative to the repository root
Z_DIM = 64                                      # the tiny GenForce checkpoint's z (and w) width
SCRIPTS = 'stylegan_and_segmentation'
BUILDER = 'tests/make_small_example.py'
V1_FILE, V3_CKPT, V3_Z = ('stylegan_gen_fine_tuned_v1.pth', 'stylegan_gen_fine_tuned_v3_ckpt_0000_gen.pth',
                          'test_z_vector_0000.csv')
V2_CNN = 'stylegan_gen_fine_tuned_v2_cnn.pth'
V3_TEST_GRID = 'eyes=-1.8,1.8;pose=-1.2,1.2'
EVAL_GRID = 'mouth=-1,0,1'
PARSED = [0, 3, 4, 5, 6]                        # kept by stage 2 and with a face for stage 3
KEPT = PARSED + [small.NO_FACE_IMG_NO]


@dataclass(frozen=True)
class Command:
    """One command of the example: the step it belongs to, the program and its arguments (with $ROOT, $SMALL)."""
    step: str
    program: str
    args: tuple[str, ...]

    def text(self) -> str:
        """The command line as docs/small-example.md writes it."""
        return ' '.join(['python', self.program, *map(_shell_word, self.args)])


def _shell_word(word: str) -> str:
    return word if re.fullmatch(r'[\w@%+=:,./$-]+', word) else shlex.quote(word)


def _cmd(step, program, *args) -> Command:
    return Command(step, program, tuple(str(a) for a in args))


def pipeline_commands(directions_num: int = 48) -> list[Command]:
    """Every command of the small example, in order (docs/small-example.md lists the default ones)."""
    run = ('--root', '$ROOT')
    cpu = ('--device', 'cpu')
    v3_ckpt, v3_z = f'$ROOT/stylegan_modified/{V3_CKPT}', f'$ROOT/stylegan_modified/{V3_Z}'
    return [
        _cmd('inputs', BUILDER, '--out', '$SMALL'),
        _cmd('stage 1', f'{SCRIPTS}/run_original_generator.py', *run, '--weights', TINY, '--num', small.NUM_IMAGES,
             *cpu),
        _cmd('portraits', BUILDER, '--out', '$SMALL', '--use-portraits', '$ROOT'),
        _cmd('stage 2', f'{SCRIPTS}/run_cnn.py', *run, '--weights', '$SMALL/cnn_weights', '--labels',
             '$SMALL/labels.csv', '--workers', 0, *cpu),
        _cmd('stage 3', f'{SCRIPTS}/run_segmentation.py', *run, '--weights', '$SMALL/facexformer_synthetic.pt',
             '--batch-size', 4, *cpu),
        _cmd('known maps', BUILDER, '--out', '$SMALL', '--use-known-maps', '$ROOT'),
        _cmd('stage 4 algorithm 1', f'{SCRIPTS}/compute_property_scores.py', *run, '--algorithm', 1),
        _cmd('stage 4 algorithm 2', f'{SCRIPTS}/compute_property_scores.py', *run, '--algorithm', 2),
        _cmd('stage 5 v1', f'{SCRIPTS}/run_stylegan_fine_tuning.py', *run, '--weights', TINY, '--epochs', 1,
             '--batch-size', 2, '--workers', 0, '--snapshot-every', 0, *cpu),
        _cmd('stage 5 v2', f'{SCRIPTS}/run_stylegan_fine_tuning_v2.py', *run, '--max-epochs', 1, '--batch-size', 2,
             '--eval-batch-size', 2, '--workers', 0, *cpu),
        _cmd('stage 5 v3', f'{SCRIPTS}/run_stylegan_fine_tuning_v3.py', *run, '--epochs', 1, '--batch-size', 2,
             '--workers', 0, '--gender-cnn', '$SMALL/cnn_weights/gender_model_0.pt', '--test-z', 2,
             '--test-grid', V3_TEST_GRID, '--test-random', 0, '--pass-min-r', 'eyes=-1,mouth=-1,pose=-1',
             '--pass-max-mae', 'eyes=none,mouth=none,pose=none', *cpu),
        _cmd('stage 6 v1', f'{SCRIPTS}/run_fine_tuned_generator.py', *run, '--model', 'v1', '--z-csv', v3_z,
             '--num', 2, *cpu),
        _cmd('stage 6 v3', f'{SCRIPTS}/run_fine_tuned_generator.py', *run, '--model', 'v3', '--weights', v3_ckpt,
             '--z-csv', v3_z, '--num', 2, *cpu),
        _cmd('attribute directions', f'{SCRIPTS}/find_attribute_directions.py', *run, '--weights', TINY,
             '--num', directions_num, '--method', 'ridge', '--batch-size', 16, *cpu),
        _cmd('evaluation v1', f'{SCRIPTS}/evaluate_attribute_control.py', *run, '--model', 'v1',
             '--measure', 'property-cnn', '--num', 2, '--grid', EVAL_GRID, '--cnn-weights', '$SMALL/cnn_weights',
             '--no-identity', *cpu),
        _cmd('evaluation v3', f'{SCRIPTS}/evaluate_attribute_control.py', *run, '--model', 'v3', '--weights',
             v3_ckpt, '--num', 2, '--grid', EVAL_GRID, '--cnn-weights', '$SMALL/cnn_weights', '--no-identity',
             *cpu),
        *directions_commands(),
    ]


def directions_commands() -> list[Command]:
    """Stage 6 and the evaluation with the attribute directions (``--model directions``)."""
    run, cpu = ('--root', '$ROOT'), ('--device', 'cpu')
    directions = '$ROOT/stylegan_modified/attribute_directions.pt'
    return [
        _cmd('stage 6 directions', f'{SCRIPTS}/run_fine_tuned_generator.py', *run, '--model', 'directions',
             '--directions', directions, '--weights', TINY, '--z-csv', f'$ROOT/stylegan_modified/{V3_Z}',
             '--num', 2, *cpu),
        _cmd('evaluation directions', f'{SCRIPTS}/evaluate_attribute_control.py', *run, '--model', 'directions',
             '--directions', directions, '--weights', TINY, '--num', 2, '--grid', EVAL_GRID,
             '--cnn-weights', '$SMALL/cnn_weights', '--no-identity', *cpu),
    ]


# --- running the steps ------------------------------------------------------------------------------------------

@contextmanager
def step(name: str):
    """Report any failure inside as a failure of step ``name``."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f'{name}: {exc}') from exc
    except Exception as exc:  # a KeyError of a missing column, a file that is not there, ...
        raise AssertionError(f'{name}: {type(exc).__name__}: {exc}') from exc


class Pipeline:
    """The example's folders and its commands; ``run(step)`` runs one step's command in-process."""

    def __init__(self, folder: Path, capsys, commands: list[Command]):
        self.root, self.small = folder / 'run', small.SmallExample(folder / 'small_inputs')
        self.layout = Layout(self.root)
        self.capsys = capsys
        self.commands = {c.step: c for c in commands}

    def argv(self, command: Command) -> list[str]:
        def resolve(word):
            word = word.replace('$ROOT', str(self.root)).replace('$SMALL', str(self.small.folder))
            return str(CODE_ROOT / word) if word.startswith('tests/') else word
        return [resolve(w) for w in command.args]

    def label(self, name: str) -> str:
        return f'{name} ({Path(self.commands[name].program).name})'

    def run(self, name: str) -> str:
        """Run the command of step ``name``; its stdout (the exit status must be 0)."""
        command = self.commands[name]
        self.capsys.readouterr()
        if command.program == BUILDER:
            try:
                small.main(self.argv(command))
                status = 0
            except SystemExit as exc:
                status = exc.code
        else:
            status = run_script(Path(command.program).name, *self.argv(command))
        out, err = self.capsys.readouterr()
        assert status == 0, f'exit status {status}: {err.strip()[-600:]}'
        return out

    def remove_large_inputs(self) -> None:
        """The synthetic FaceXFormer and the ten stage-2 CNN files: 0.6 GB that nobody needs to inspect."""
        self.small.facexformer.unlink(missing_ok=True)
        shutil.rmtree(self.small.cnn_weights, ignore_errors=True)


def state_dict(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def decoded_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f'{path} does not decode'
    return image[:, :, ::-1]


def close_to_jpeg(path: Path, rgb: np.ndarray) -> bool:
    """The JPEG at ``path`` holds ``rgb`` up to JPEG error (the expected pixels are encoded the same way)."""
    _, jpeg = cv2.imencode('.jpg', np.ascontiguousarray(rgb[:, :, ::-1]))
    difference = np.abs(cv2.imread(str(path), cv2.IMREAD_COLOR).astype(int) -
                        cv2.imdecode(jpeg, cv2.IMREAD_COLOR).astype(int))
    return difference.max() <= 8 and difference.mean() < 0.05


def strict_json(path: Path):
    """A JSON file that must hold no NaN or infinity."""
    def refuse(constant):
        raise AssertionError(f'{path.name} holds {constant}')
    return json.loads(path.read_text(), parse_constant=refuse)


def max_difference(frame, expected) -> float:
    return float(np.abs(np.asarray(frame, dtype=np.float64) - np.asarray(expected, dtype=np.float64)).max())


def reference_raw(algorithm: int, cases) -> np.ndarray:
    frame = pd.read_csv(small.PROPERTY_FIXTURES.parent / f'scores_alg{algorithm}_raw.csv', dtype=str)
    frame = frame.set_index(frame['img_no'].astype(int))
    assert (frame.loc[list(cases), 'status'] == 'ok').all()
    return frame.loc[list(cases), list(SCORE_COLUMNS)].astype(float).to_numpy()


# --- the steps ----------------------------------------------------------------------------------------------------

def _inputs(p: Pipeline) -> None:
    with step(p.label('inputs')):
        p.run('inputs')
        for prop, outputs in small.FOLD_OUTPUTS.items():
            for fold, output in enumerate(outputs):
                state = state_dict(p.small.cnn_model(prop, fold))
                assert torch.sigmoid(state['fc_final.0.bias']).item() == pytest.approx(output, abs=1e-7)
        assert sorted(q.name for q in p.small.portraits.iterdir()) == [image_name(n) for n in range(small.NUM_IMAGES)]
        assert p.small.facexformer.stat().st_size > 300e6  # the published layout at full size


def _stage1(p: Pipeline, tiny: Path) -> None:
    with step(p.label('stage 1')):
        p.run('stage 1')
        layout = p.layout
        assert sorted(q.name for q in layout.synthesized_dir.iterdir()) == \
            [image_name(n) for n in range(small.NUM_IMAGES)]
        z = pd.read_csv(layout.synthesized_z_csv)
        assert list(z.columns) == ['img_no', *(f'z{k}' for k in range(Z_DIM))]
        assert z['img_no'].tolist() == list(range(small.NUM_IMAGES))
        z_values = torch.tensor(z.iloc[:, 1:].to_numpy(), dtype=torch.float32)
        for n in range(small.NUM_IMAGES):  # the record is the z each image was drawn from (seed 0)
            assert torch.equal(z_values[n], sampled_latent(0, n, Z_DIM)), f'z record row {n}'
        meta = json.loads(layout.synthesized_meta.read_text())
        assert meta['source'] == 'sampled' and meta['weights_file'] == 'tiny_ckpt.pth'
        assert meta['settings']['seed'] == 0 and meta['settings']['z_dim'] == Z_DIM
        assert meta['settings']['weights_sha256'] == sha256_of(tiny)
        generator = load_generator(tiny)
        with torch.no_grad():
            expected = to_uint8(generator(z_values[:2], trunc_psi=1.0, trunc_layers=0)['image'])
        for n in range(2):  # the images are G(z) of the recorded z
            assert close_to_jpeg(layout.synthesized_image(n), expected[n]), f'image {n} is not G(z_{n})'


def _portraits(p: Pipeline) -> None:
    with step(p.label('portraits')):
        meta = p.layout.synthesized_meta.read_bytes()
        out = p.run('portraits')
        assert f'replaced images {list(range(small.NUM_IMAGES))}' in out
        for n in range(small.NUM_IMAGES):
            assert p.layout.synthesized_image(n).read_bytes() == (p.small.portraits / image_name(n)).read_bytes()
        for n, case in enumerate(small.PORTRAIT_CASES):
            assert (p.small.portraits / image_name(n)).read_bytes() == \
                (small.PROPERTY_FIXTURES / image_name(case)).read_bytes()
        assert p.layout.synthesized_meta.read_bytes() == meta  # stage 2 still reads stage 1's record


def _stage2(p: Pipeline) -> None:
    layout = p.layout
    with step(p.label('stage 2')):
        p.run('stage 2')
        labelled = sorted(small.LABELS)
        scored = [n for n in range(small.NUM_IMAGES) if n not in small.LABELS]
        ensemble = {}
        for prop, outputs in small.FOLD_OUTPUTS.items():
            frame = pd.read_csv(layout.cnn_inference_csv(prop))
            assert list(frame.columns) == ['img_no', 'img_path', f'property_{prop}_final_score',
                                           *(f'score_model_{k}' for k in range(5))]
            assert frame['img_no'].tolist() == scored  # the labelled images are not scored
            assert frame['img_path'].tolist() == [layout.relative(layout.synthesized_image(n)) for n in scored]
            for k, output in enumerate(outputs):  # every fold file was used: its own constant
                assert np.allclose(frame[f'score_model_{k}'], round(output, 4), atol=1e-12), (prop, k)
            ensemble[prop] = round(float(np.mean(outputs)), 4)
            assert np.allclose(frame[f'property_{prop}_final_score'], ensemble[prop], atol=1e-12), prop

        merged = pd.read_csv(layout.cnn_merged_csv)
        assert list(merged.columns) == ['img_no', 'img_path', 'gender_score', 'quality_score']
        assert merged['img_no'].tolist() == list(range(small.NUM_IMAGES))
        expected = {n: (float(g), float(q)) for n, (q, g) in small.LABELS.items()}
        expected |= {n: (ensemble['gender'], ensemble['quality']) for n in scored}
        assert {int(r.img_no): (r.gender_score, r.quality_score) for r in merged.itertuples()} == expected

        # Kept: gender >= 0.7 and quality >= 0.9. Image 1 is labelled a man, image 2 a bad image; the
        # constant nets pass every scored image.
        kept = [n for n, (g, q) in sorted(expected.items()) if g >= 0.7 and q >= 0.9]
        assert kept == KEPT and labelled == [0, 1, 2]
        assert sorted(q.name for q in layout.filtered_dir.iterdir()) == [image_name(n) for n in KEPT]
        for n in KEPT:
            assert layout.filtered_image(n).read_bytes() == layout.synthesized_image(n).read_bytes()


def _stage3(p: Pipeline) -> None:
    layout = p.layout
    with step(p.label('stage 3')):
        p.run('stage 3')
        skipped = pd.read_csv(layout.segmentation_skipped_csv)
        assert list(skipped.columns) == ['img_no', 'reason']
        assert skipped.values.tolist() == [[small.NO_FACE_IMG_NO, 'no face detected']]  # the sky
        for n in PARSED:
            classes = cv2.imread(str(layout.parsing_map(n)), cv2.IMREAD_UNCHANGED)
            assert classes.dtype == np.uint8 and classes.shape == (224, 224), \
                f'parsing map {n} is {classes.dtype} {classes.shape}, not 8-bit single channel 224x224'
            assert classes.max() <= 10, f'parsing map {n} has class {classes.max()}'
            assert decoded_rgb(layout.face_crop(n)).shape == (224, 224, 3), f'face crop {n}'
            assert decoded_rgb(layout.parsing_visualization(n)).shape == (224, 224, 3), f'visualization {n}'
        no_face = small.NO_FACE_IMG_NO
        assert not any(q.exists() for q in (layout.parsing_map(no_face), layout.face_crop(no_face),
                                            layout.parsing_visualization(no_face)))
        meta = json.loads(layout.segmentation_meta.read_text())
        assert meta['weights_file'] == p.small.facexformer.name
        assert (meta['parsed_this_run'], meta['skipped_this_run']) == (len(PARSED), 1)

    with step(p.label('known maps')):
        out = p.run('known maps')
        assert f'replaced the maps of images {PARSED}' in out, out
        for n in PARSED:
            assert layout.parsing_map(n).read_bytes() == p.small.known_map(n).read_bytes()
            assert layout.face_crop(n).read_bytes() == p.small.known_face(n).read_bytes()


def _stage4(p: Pipeline, algorithm: int) -> None:
    layout = p.layout
    with step(p.label(f'stage 4 algorithm {algorithm}')):
        p.run(f'stage 4 algorithm {algorithm}')
        cases = [small.PORTRAIT_CASES[n] for n in PARSED]
        upstream = reference_raw(algorithm, cases)
        raw = read_raw_scores(layout.property_scores_raw_csv(algorithm))
        assert list(raw.columns) == ['img_no', *SCORE_COLUMNS] and raw['img_no'].tolist() == PARSED
        difference = max_difference(raw[list(SCORE_COLUMNS)], upstream)
        assert difference <= 1e-9, f'raw scores differ from the upstream scores of the drawn cases by {difference:.3g}'

        mean, std = upstream.mean(axis=0), upstream.std(axis=0, ddof=1)
        normalised = pd.read_csv(layout.property_scores_csv(algorithm))
        assert list(normalised.columns) == ['img_no', 'img_path', *SCORE_COLUMNS]
        assert normalised['img_no'].tolist() == PARSED
        assert normalised['img_path'].tolist() == [layout.relative(layout.filtered_image(n)) for n in PARSED]
        difference = max_difference(normalised[list(SCORE_COLUMNS)], (upstream - mean) / std)
        assert difference <= 5e-5 + 1e-9, f'z-scores off by {difference:.3g}'

        stats = strict_json(layout.property_scores_stats(algorithm))
        assert stats['algorithm'] == algorithm and stats['images'] == len(PARSED)
        for k, column in enumerate(SCORE_COLUMNS):
            entry = stats['columns'][column]
            assert entry['mean'] == pytest.approx(mean[k], rel=1e-9, abs=1e-12), column
            assert entry['std'] == pytest.approx(std[k], rel=1e-9), column


def _v1(p: Pipeline, tiny: Path) -> None:
    layout = p.layout
    with step(p.label('stage 5 v1')):
        p.run('stage 5 v1')
        files = layout.training_run('v1')
        generator = load_conditional_generator(layout.fine_tuned(V1_FILE), 'v1')
        load_conditional_discriminator(layout.fine_tuned('stylegan_dis_fine_tuned_v1.pth'), 'v1')
        assert generator.label_size == 7 and generator.z_space_dim == Z_DIM
        log = pd.read_csv(files.train_log)
        assert log[['epoch', 'idx']].values.tolist() == [[0, 0], [0, 1], [0, 2]]  # 5 images at batch 2
        assert np.isfinite(log[['d_loss', 'g_loss']].to_numpy()).all()
        provenance = json.loads(files.options_json.read_text())['provenance']
        assert provenance['scores_csv'] == layout.property_scores_csv(1).name and provenance['images'] == len(PARSED)
        assert provenance['zoo_sha256'] == sha256_of(tiny)
        zoo, tuned = state_dict(tiny)['generator'], state_dict(layout.fine_tuned(V1_FILE))
        synthesis = [k for k in zoo if k.startswith('synthesis.')]
        assert synthesis and all(torch.equal(tuned[k], zoo[k]) for k in synthesis)  # frozen, from the zoo file
        assert not torch.equal(tuned['mapping.dense1.weight'], zoo['mapping.dense1.weight'])  # trained


def _v2(p: Pipeline) -> None:
    layout = p.layout
    with step(p.label('stage 5 v2')):
        p.run('stage 5 v2')
        cnn = load_property_cnn(layout.fine_tuned(V2_CNN))
        files = layout.training_run('v2_cnn')
        log = pd.read_csv(files.train_log)
        assert log['epoch'].tolist() == [0] and np.isfinite(log['valid_loss']).all()
        options = json.loads(files.options_json.read_text())['options']
        assert options['data']['train'] == 4  # 5 images: 4 train, 1 validation

        scores = pd.read_csv(layout.property_cnn_scores_csv)
        assert list(scores.columns) == ['img_no', 'img_path', *SCORE_COLUMNS]
        assert scores['img_no'].tolist() == PARSED
        assert scores['img_path'].tolist() == [layout.relative(layout.filtered_image(n)) for n in PARSED]
        images = torch.stack([decode_rgb(layout.filtered_image(n)) for n in PARSED]).float() / 127.5 - 1
        with torch.no_grad():
            expected = cnn(images).numpy()
        difference = max_difference(scores[list(SCORE_COLUMNS)], expected)
        assert difference <= 1e-4, f'{layout.property_cnn_scores_csv.name} is not the scores of the trained CNN ({difference:.3g} off)'

        compare = pd.read_csv(layout.property_cnn_compare_csv)
        stage4 = pd.read_csv(layout.property_scores_csv(2))
        assert compare['img_no'].tolist() == PARSED
        for name in PROPERTY_NAMES:
            assert np.allclose(compare[f'{name}_v2'], stage4[f'{name}_score'], atol=1e-12), name
            assert np.allclose(compare[f'{name}_v2_cnn'], scores[f'{name}_score'], atol=1e-12), name


def _v3(p: Pipeline) -> None:
    layout = p.layout
    with step(p.label('stage 5 v3')):
        p.run('stage 5 v3')
        out = V3Outputs(layout.training_run('v3'))
        log = pd.read_csv(out.files.train_log)
        assert log[['epoch', 'idx']].values.tolist() == [[0, 0], [0, 1], [0, 2]]
        # the gender CNN of fold 0 outputs 0.76 for every image: G = (1 - 0.76)^2
        gender_output = small.FOLD_OUTPUTS['gender'][0]
        assert np.allclose(log['gender_loss'], (1 - gender_output) ** 2, rtol=1e-5)
        assert np.isfinite(log[['total_loss', 'property_loss', 'mu_loss', 'logvar_loss']].to_numpy()).all()
        record = json.loads(out.files.options_json.read_text())
        inputs, provenance = record['options']['inputs'], record['provenance']
        assert provenance['v1_sha256'] == sha256_of(layout.fine_tuned(V1_FILE))  # stage 5 v1's generator
        assert inputs['property_cnn_sha256'] == sha256_of(layout.fine_tuned(V2_CNN))  # stage 5 v2's CNN
        assert inputs['gender_cnn_sha256'] == sha256_of(p.small.cnn_model('gender', 0))
        assert provenance['scores_csv'] == layout.property_cnn_scores_csv.name and provenance['images'] == len(PARSED)

        test = out.epoch_test(0)
        result = pd.read_csv(test.result_each_z_csv)
        assert result['z_idx'].tolist() == [0, 1] and (result['passed'] == 'O').all()  # permissive thresholds
        generator = load_conditional_generator(out.epoch_checkpoint(0, 'gen'), 'v3')
        encoder = load_cvae_encoder(out.epoch_checkpoint(0, 'enc'))
        assert generator.z_space_dim == Z_DIM and encoder.latent_dim == Z_DIM
        assert out.epoch_checkpoint(0, 'gen').name == V3_CKPT and out.test_z_csv(0).name == V3_Z
        best = int(log['best_z'].dropna().iloc[-1])
        test_zs = pd.read_csv(test.zs_csv).to_numpy()
        assert np.array_equal(read_z_csv(out.test_z_csv(0), Z_DIM), test_zs[best])  # the best passing z
        assert out.final_generator.is_file() and out.final_encoder.is_file()
        v1, v3 = state_dict(layout.fine_tuned(V1_FILE)), state_dict(out.epoch_checkpoint(0, 'gen'))
        synthesis = [k for k in v1 if k.startswith('synthesis.')]
        assert synthesis and all(torch.equal(v3[k], v1[k]) for k in synthesis)  # the decoder is v1's


def _stage6(p: Pipeline, model: str, weights: Path) -> None:
    layout = p.layout
    with step(p.label(f'stage 6 {model}')):
        p.run(f'stage 6 {model}')
        generated = layout.generation_folder(model)
        folder = generated.folder
        assert sorted(q.name for q in folder.glob('*.jpg')) == [image_name(0), image_name(1)]
        z_csv = V3Outputs(layout.training_run('v3')).test_z_csv(0)
        record = json.loads(generated.settings_json.read_text())
        settings = record['settings']
        assert settings['model'] == model and settings['label'] == UPSTREAM_LABEL
        assert record['weights_file'] == weights.name and settings['weights_sha256'] == sha256_of(weights)
        assert record['z_file'] == z_csv.name
        z = pd.read_csv(generated.z_csv)
        assert z['img_no'].tolist() == [0, 1]
        z0 = torch.tensor(z.iloc[:1, 1:].to_numpy(np.float32))
        assert torch.equal(z0[0], torch.tensor(read_z_csv(z_csv, Z_DIM), dtype=torch.float32))  # v3's passing z
        generator = load_conditional_generator(weights, model)
        label = torch.tensor(label_vector(UPSTREAM_LABEL), dtype=torch.float32)[None]
        with torch.no_grad():
            expected = to_uint8(generator(z0, label, trunc_psi=1.0, trunc_layers=0)['image'])
        assert close_to_jpeg(generated.image(0), expected[0]), 'image 0 is not G(z CSV, label)'


def _directions(p: Pipeline, tiny: Path, num: int) -> None:
    layout = p.layout
    with step(p.label('attribute directions')):
        p.run('attribute directions')
        directions = read_directions(layout.attribute_directions)
        assert (directions.method, directions.attributes, directions.num) == ('ridge', ('eyes', 'mouth', 'pose'), num)
        assert directions.generator['sha256'] == sha256_of(tiny) and directions.w_dim == Z_DIM
        assert directions.property_cnn['sha256'] == sha256_of(layout.fine_tuned(V2_CNN))  # stage 5 v2's CNN
        assert torch.isfinite(directions.weights).all() and torch.isfinite(directions.intercepts).all()
        report = strict_json(layout.directions_report(layout.attribute_directions))
        for name in directions.attributes:
            quality = report['fit_quality'][name]
            assert quality['n_test'] > 0 and -1 <= quality['r'] <= 1, name

        # Sample i is stage 1's z_i through the tiny G, scored by the v2 CNN as the evaluation measures it (uint8,
        # JPEG and back).
        from stylegan_modified.delivered_images import cnn_input, delivered
        chunk = torch.load(layout.direction_samples().chunk(0), map_location='cpu', weights_only=True)
        generator, cnn = load_generator(tiny), load_property_cnn(layout.fine_tuned(V2_CNN))
        z = torch.tensor(pd.read_csv(layout.synthesized_z_csv).iloc[:2, 1:].to_numpy(), dtype=torch.float32)
        with torch.no_grad():
            w = generator.mapping(z)['w']
            images = generator.synthesis(w[:, None].repeat(1, generator.num_layers, 1))['image']
            scores = cnn(cnn_input(delivered(images), torch.device('cpu')))
        assert torch.allclose(chunk['w'][:2], w, atol=1e-5)
        assert torch.allclose(chunk['scores'][:2], scores, atol=1e-4)
        edited = directions.edit(w, torch.tensor([[1.0, -0.5, 2.0]] * 2))  # what stage 6 and the evaluation do
        assert torch.allclose(directions.predict(edited)[:, :3], torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64),
                              atol=1e-3)


def _evaluation(p: Pipeline, model: str, weights: Path) -> None:
    layout = p.layout
    with step(p.label(f'evaluation {model}')):
        p.run(f'evaluation {model}')
        folder = layout.attribute_control_folder(model, 'property-cnn')
        summary = strict_json(folder.summary_json)  # no NaN or infinity anywhere
        assert summary['run'] == {'model': model, 'measure': 'property-cnn', 'algorithm': 2,
                                  'model_score_algorithm': 1 if model == 'v1' else 2, 'z_source': 'seed 0',
                                  'labels_per_z': 3, 'images': 6}
        assert summary['grid'] == {'mouth': [-1.0, 0.0, 1.0]} and summary['swept'] == ['mouth']
        assert (summary['num_z'], summary['measured_images'], summary['unmeasured_z']) == (2, 6, 0)
        for figure in ('r', 'abs_r', 'mae'):
            stats = summary['attributes']['mouth'][figure]
            assert stats['count'] == 2 and all(isinstance(stats[k], float) for k in ('mean', 'median', 'p10', 'p90'))
        assert set(summary['pass_rules']) == {'upstream_v3', 'strict'}
        assert np.isfinite(np.array(summary['leakage']['slope_mean'], dtype=float)).all()
        # the judges are the constant stage-2 nets: every image female (0.80) and good (0.95)
        assert (summary['shares']['female'], summary['shares']['good_quality']) == (1.0, 1.0)
        assert summary['left_out'] == ['identity: switched off (--no-identity)']

        per_image = pd.read_csv(folder.per_image_csv)
        assert len(per_image) == 6 and per_image['measured'].all()
        assert np.allclose(per_image['gender'], 0.8) and np.allclose(per_image['quality'], 0.95)
        assert per_image['requested_mouth'].tolist() == [-1.0, 0.0, 1.0] * 2
        settings = json.loads(folder.settings_json.read_text())
        assert settings['generator']['files'] == {weights.name: sha256_of(weights)}
        assert settings['measure']['weights_sha256'] == sha256_of(layout.fine_tuned(V2_CNN))


def _stage6_and_evaluation_with_directions(p: Pipeline, tiny: Path) -> None:
    """Stage 6 and the evaluation with ``--model directions`` on the directions found above."""
    layout = p.layout
    directions_file = layout.attribute_directions
    with step(p.label('stage 6 directions')):
        p.run('stage 6 directions')
        generated = layout.generation_folder('directions')
        assert sorted(q.name for q in generated.folder.glob('*.jpg')) == [image_name(0), image_name(1)]
        record = json.loads(generated.settings_json.read_text())
        assert record['settings']['model'] == 'directions'
        assert json.dumps(record).count(sha256_of(directions_file)) >= 1  # the directions file is recorded
        from stylegan_modified.attribute_directions import load_directions_control
        control = load_directions_control(directions_file, tiny, 'cpu')
        z = pd.read_csv(generated.z_csv)
        z0 = torch.tensor(z.iloc[:1, 1:].to_numpy(np.float32))
        values = torch.tensor(label_vector(UPSTREAM_LABEL), dtype=torch.float32)[None]
        with torch.no_grad():
            expected = to_uint8(control.images(z0, values))
        assert close_to_jpeg(generated.image(0), expected[0]), 'image 0 is not the edited G(z CSV)'
    with step(p.label('evaluation directions')):
        p.run('evaluation directions')
        folder = layout.attribute_control_folder('directions', 'property-cnn')
        summary = strict_json(folder.summary_json)
        assert summary['run']['model'] == 'directions' and summary['run']['images'] == 6
        assert summary['attributes']['mouth']['r']['count'] == 2
        assert (summary['shares']['female'], summary['shares']['good_quality']) == (1.0, 1.0)
        settings = json.loads(folder.settings_json.read_text())
        assert sha256_of(directions_file) in json.dumps(settings['generator']['files'])


# --- the tests ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('directions_num', [48, pytest.param(320, marks=pytest.mark.slow)],
                         ids=['fast', 'few-hundred-directions-samples'])
def test_pipeline_end_to_end(tmp_path, capsys, directions_num):
    p = Pipeline(tmp_path, capsys, pipeline_commands(directions_num))
    tiny = CODE_ROOT / TINY
    try:
        _inputs(p)
        _stage1(p, tiny)
        _portraits(p)
        _stage2(p)
        _stage3(p)
        _stage4(p, 1)
        _stage4(p, 2)
        _v1(p, tiny)
        _v2(p)
        _v3(p)
        _stage6(p, 'v1', p.layout.fine_tuned(V1_FILE))
        _stage6(p, 'v3', p.layout.fine_tuned(V3_CKPT))
        _directions(p, tiny, directions_num)
        _evaluation(p, 'v1', p.layout.fine_tuned(V1_FILE))
        _evaluation(p, 'v3', p.layout.fine_tuned(V3_CKPT))
        _stage6_and_evaluation_with_directions(p, tiny)
    finally:
        p.remove_large_inputs()
    shutil.rmtree(p.root)  # passed: the 0.4 GB of checkpoints and records need not wait for pytest's cleanup


def _page_commands(page: Path) -> list[str]:
    """The ``python …`` lines of the page's code blocks, continuation lines joined."""
    blocks = re.findall(r'```bash\n(.*?)```', page.read_text(), flags=re.S)
    lines = '\n'.join(blocks).replace('\\\n', ' ').splitlines()
    return [' '.join(line.split()) for line in lines if line.strip().startswith('python ')]


def test_the_small_example_page_lists_exactly_the_commands_of_the_test():
    page = CODE_ROOT / 'docs' / 'small-example.md'
    assert _page_commands(page) == [c.text() for c in pipeline_commands()]


def test_the_stand_in_steps_refuse_a_root_the_stages_have_not_filled(tmp_path, capsys):
    example = small.SmallExample(tmp_path / 'small_inputs')
    small.write_portraits(example)
    small.write_known_maps(example)
    root = tmp_path / 'run'

    def refused(*argv, match):
        with pytest.raises(SystemExit) as exit_status:
            small.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit_status.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1 and match in err, err
        assert not root.exists()

    refused('--out', tmp_path / 'none', '--use-portraits', root, match='holds no small example inputs')
    refused('--out', example.folder, '--use-portraits', root, match='run stage 1 with --num 8 first')
    refused('--out', example.folder, '--use-known-maps', root, match='run stage 3 (run_segmentation.py) first')
