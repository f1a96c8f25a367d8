"""find_attribute_directions.py end to end on tiny weights: outputs, rerun, resume, upstream recipe, bad input."""
import json

import pytest
import torch

from direction_toys import PooledScorer
from ohlora.records import sha256_of
from script_runner import files_of, run_script
from stylegan_modified.attribute_directions import load_directions_control
from stylegan_modified.controllable import ControllableGenerator
from stylegan_modified.directions_file import read_directions
from stylegan_modified.property_score_cnn import PropertyScoreCNN

SCRIPT = 'find_attribute_directions.py'


@pytest.fixture(scope='module')
def inputs(reference_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp('directions_inputs')
    torch.manual_seed(0)
    torch.save(PropertyScoreCNN().state_dict(), folder / 'cnn.pth')  # random weights, the real architecture
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    torch.save(tiny['state_dicts']['v1_generator'], folder / 'v1.pth')
    return {'genforce': reference_dir / 'genforce' / 'tiny_ckpt.pth', 'cnn': folder / 'cnn.pth',
            'v1': folder / 'v1.pth'}


def args(inputs, root, *extra, weights=None):
    return ['--weights', weights or inputs['genforce'], '--property-cnn', inputs['cnn'], '--root', root,
            '--device', 'cpu', '--no-progress', *extra]


class StandInScorer:
    """Cheap stand-in for the property CNN (the script still loads the real file; the 256 px forward is skipped)."""
    fail_after = None

    def __init__(self, cnn):
        self.pooled = PooledScorer()

    def __call__(self, images):
        if StandInScorer.fail_after is not None:
            if StandInScorer.fail_after == 0:
                raise KeyboardInterrupt
            StandInScorer.fail_after -= 1
        return self.pooled(images)


@pytest.fixture
def stand_in(monkeypatch):
    import stylegan_modified.direction_finding as finding
    monkeypatch.setattr(finding, 'PropertyCNNScorer', StandInScorer)
    StandInScorer.fail_after = None
    yield StandInScorer
    StandInScorer.fail_after = None


def test_end_to_end_with_the_real_property_cnn_architecture(inputs, tmp_path, capsys):
    root = tmp_path / 'root'
    extra = ['--num', '10', '--holdout', '0.25', '--chunk-size', '5', '--batch-size', '5']
    assert run_script(SCRIPT, *args(inputs, root, *extra)) == 0
    out = capsys.readouterr().out
    assert 'ridge directions for eyes, mouth, pose from 10 samples (10 sampled now, 0 reused' in out
    assert 'eyes: held-out R²' in out
    path = root / 'stylegan_modified' / 'attribute_directions.pt'
    directions = read_directions(path)
    assert directions.generator['sha256'] == sha256_of(inputs['genforce']) and directions.generator['kind'] == 'original'
    assert directions.property_cnn == {'file': 'cnn.pth', 'bytes': inputs['cnn'].stat().st_size,
                                       'sha256': sha256_of(inputs['cnn'])}
    assert (directions.num, directions.seed, directions.layers, directions.method) == (10, 0, (0, 13), 'ridge')
    report = json.loads((root / 'stylegan_modified' / 'attribute_directions_fit_quality.json').read_text())
    assert set(report['fit_quality']) == {'eyes', 'mouth', 'pose'} and report['fit_quality']['eyes']['n_test'] == 2
    samples = root / 'stylegan_modified' / 'attribute_direction_samples'
    assert sorted(p.name for p in samples.iterdir()) == ['chunk_000000.pt', 'chunk_000001.pt', 'samples_settings.json']

    control = load_directions_control(path, inputs['genforce'], 'cpu')
    assert isinstance(control, ControllableGenerator)
    assert control.images(torch.randn(2, 64), torch.zeros(2, 7)).shape == (2, 3, 256, 256)

    before = files_of(samples)
    assert run_script(SCRIPT, *args(inputs, root, *extra)) == 0  # a rerun reuses every sample
    assert '(0 sampled now, 10 reused' in capsys.readouterr().out
    assert files_of(samples) == before
    assert torch.equal(read_directions(path).weights, directions.weights)


def test_an_interrupted_run_resumes_to_the_same_directions(inputs, tmp_path, stand_in, capsys):
    extra = ['--num', '30', '--chunk-size', '8', '--batch-size', '4', '--orthogonal', '--layers', '0-7']
    assert run_script(SCRIPT, *args(inputs, tmp_path / 'whole', *extra)) == 0
    stand_in.fail_after = 5  # dies in the 6th batch: chunks 0 and 1 done
    assert run_script(SCRIPT, *args(inputs, tmp_path / 'parts', *extra)) == 130
    assert 'interrupted' in capsys.readouterr().err
    stand_in.fail_after = None
    assert not (tmp_path / 'parts' / 'stylegan_modified' / 'attribute_directions.pt').exists()
    assert run_script(SCRIPT, *args(inputs, tmp_path / 'parts', *extra)) == 0
    assert '(14 sampled now, 16 reused' in capsys.readouterr().out
    whole, parts = (read_directions(tmp_path / r / 'stylegan_modified' / 'attribute_directions.pt')
                    for r in ('whole', 'parts'))
    assert whole.held_attributes == ('hair_color', 'hair_length', 'background_mean', 'background_std')
    assert whole.layers == (0, 7)
    for key in ('weights', 'intercepts', 'directions'):
        assert torch.equal(getattr(whole, key), getattr(parts, key))


def test_the_upstream_recipe_on_a_v1_base(inputs, tmp_path, stand_in, capsys):
    output = tmp_path / 'out' / 'upstream.pt'
    assert run_script(SCRIPT, *args(inputs, tmp_path / 'root', '--compat', 'upstream', '--num', '200',
                                     '--output', output, '--chunk-size', '100', '--batch-size', '50',
                                     weights=inputs['v1'])) == 0
    assert 'svm directions for eyes, mouth, pose' in capsys.readouterr().out
    directions = read_directions(output)
    assert (directions.method, directions.num_groups, directions.generator['kind']) == ('svm', 8, 'v1')
    assert directions.generator['label'] == [0.0] * 7 and directions.options['fraction'] == 0.2
    assert (tmp_path / 'out' / 'upstream_fit_quality.json').is_file()
    control = load_directions_control(output, inputs['v1'], 'cpu')
    assert control.images(torch.randn(3, 32), torch.zeros(3, 7)).shape == (3, 3, 256, 256)


@pytest.mark.parametrize('extra, message', [
    (['--fraction', '0.3'], '--fraction applies to --method svm only'),
    (['--groups'], '--groups applies to --method svm only'),
    (['--attributes', 'eyes,nose'], "unknown attribute 'nose'"),
    (['--num', '5'], '--num 5 is too few samples'),
    (['--method', 'svm', '--fraction', '0.6'], '--fraction must be in'),
    (['--holdout', '1.5'], '--holdout must be in'),
    (['--holdout', '0.999'], '--num 30 is too few samples for this fit; use at least 7500'),
    (['--layers', '0-20'], 'outside the generator\'s layers 0..13'),
    (['--layers', 'fine'], "--layers 'fine' is not a layer range"),
    (['--generator', 'v1'], 'not the Oh-LoRA v1 generator'),
])
def test_bad_input_is_one_line_and_writes_nothing(inputs, tmp_path, capsys, extra, message):
    root = tmp_path / 'root'
    root.mkdir()
    (root / 'keep.txt').write_text('x')
    assert run_script(SCRIPT, *args(inputs, root, '--num', '30', *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and err.count('\n') == 1
    assert files_of(root) == {'keep.txt': b'x'}



@pytest.mark.parametrize('seed, method', [(-1, 'ridge'), (2 ** 40, 'svm'), (-(2 ** 70), 'svm')])
def test_any_whole_seed_samples_and_fits(inputs, tmp_path, stand_in, capsys, seed, method):
    """numpy's default_rng and LinearSVC refuse seeds outside [0, 2**32): theirs are derived from --seed, so a
    negative or huge seed no longer ends in a traceback after sampling."""
    root = tmp_path / 'root'
    assert run_script(SCRIPT, *args(inputs, root, '--num', '24', '--seed', str(seed), '--method', method,
                                     '--fraction' if method == 'svm' else '--holdout', '0.25')) == 0
    assert 'directions for eyes, mouth, pose from 24 samples' in capsys.readouterr().out
    directions = read_directions(root / 'stylegan_modified' / 'attribute_directions.pt')
    assert directions.seed == seed and directions.method == method



@pytest.mark.parametrize('where, message', [
    ('output_parent_file', 'cannot write into {out}/afile: it is a file'),
    ('report_folder', 'cannot write {out}/dirs_fit_quality.json: it is a folder'),
    ('chunk_folder', 'cannot write {samples}/chunk_000001.pt: it is a folder'),
    ('images_file', 'cannot write into {samples}/images: it is a file'),
])
def test_output_paths_are_checked_before_sampling(inputs, tmp_path, capsys, stand_in, where, message):
    """--output was checked only after sampling: the samples were written, then the run stopped."""
    out, samples = tmp_path / 'out', tmp_path / 'samples'
    out.mkdir()
    output = out / 'dirs.pt'
    extra = ['--num', '24', '--chunk-size', '12', '--samples-dir', samples]
    if where == 'output_parent_file':
        (out / 'afile').write_text('x')
        output = out / 'afile' / 'dirs.pt'
    elif where == 'report_folder':
        (out / 'dirs_fit_quality.json').mkdir()
    elif where == 'chunk_folder':
        (samples / 'chunk_000001.pt').mkdir(parents=True)
    else:
        samples.mkdir()
        (samples / 'images').write_text('x')
        extra.append('--save-images')
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob('*'))
    assert run_script(SCRIPT, *args(inputs, tmp_path / 'root', '--output', output, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1
    assert message.format(out=out, samples=samples) in err, err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob('*')) == before


def test_bad_files_are_one_line_and_write_nothing(inputs, tmp_path, capsys, stand_in):
    root = tmp_path / 'root'
    cases = [(args(inputs, root, weights=tmp_path / 'missing.pth'), 'no such file'),
             (['--weights', inputs['genforce'], '--property-cnn', inputs['genforce'], '--root', root, '--device', 'cpu'],
              'not the Oh-LoRA v2 property-score CNN'),
             (args(inputs, root, '--output', tmp_path), 'is a folder')]
    for argv, message in cases:
        assert run_script(SCRIPT, *argv) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err and err.count('\n') == 1
        assert not root.exists()
    # samples of another seed are refused, nothing changes
    assert run_script(SCRIPT, *args(inputs, root, '--num', '24', '--chunk-size', '12')) == 0
    before = files_of(root)
    assert run_script(SCRIPT, *args(inputs, root, '--num', '24', '--chunk-size', '12', '--seed', '1')) == 2
    err = capsys.readouterr().err
    assert 'holds samples made with other settings (seed 0 -> 1)' in err and err.count('\n') == 1
    assert files_of(root) == before


def test_stage6_renders_with_the_directions_and_hits_the_requested_scores(inputs, tmp_path, stand_in, capsys):
    """run_fine_tuned_generator.py --model directions: the images are the edited w's, the record keys on the
    directions file and the base weights, and a base generator other than the one fitted on is refused."""
    import numpy as np
    import pandas as pd
    from ohlora.layout import Layout
    from stylegan_modified.generation import read_z_csv, varied_latent

    root = tmp_path / 'root'
    assert run_script(SCRIPT, *args(inputs, root, '--num', '60', '--chunk-size', '30', '--batch-size', '10')) == 0
    directions_file = Layout(root).attribute_directions
    z = np.random.default_rng(3).standard_normal(64)
    pd.DataFrame([z], columns=[str(k) for k in range(64)]).to_csv(tmp_path / 'z.csv', index=False)
    stage6 = ['--model', 'directions', '--weights', inputs['genforce'], '--z-csv', tmp_path / 'z.csv', '--root', root,
              '--device', 'cpu', '--no-progress', '--num', '2', '--eyes', '0.5', '--mouth', '-0.25', '--pose', '1.0']
    assert run_script('run_fine_tuned_generator.py', *stage6) == 0
    capsys.readouterr()
    folder = Layout(root).final_inference_dir('directions')
    record = json.loads((folder / 'generation_settings.json').read_text())
    settings = record['settings']
    assert settings['model'] == 'directions' and settings['directions_sha256'] == sha256_of(directions_file)
    assert settings['weights_sha256'] == sha256_of(inputs['genforce'])
    assert record['directions_file'] == directions_file.name

    # The JPEGs are the control's images of the recorded z, and its edit puts the predicted scores on the targets.
    control = load_directions_control(directions_file, inputs['genforce'], 'cpu')
    values = torch.zeros(2, 7)
    values[:, [0, 3, 4]] = torch.tensor([0.5, -0.25, 1.0])
    latent = torch.stack([varied_latent(read_z_csv(tmp_path / 'z.csv', 64), 0, n, 0.3) for n in range(2)])
    _, edited = control.edited_w(latent, values)
    predicted = control.predicted_scores(edited)
    for name, target in (('eyes', 0.5), ('mouth', -0.25), ('pose', 1.0)):
        assert torch.allclose(predicted[name].float(), torch.full((2,), target), atol=1e-3)
    import cv2
    from stylegan.postprocess import to_uint8
    expected = to_uint8(control.images(latent, values))
    for n in range(2):  # the same pixels through the same JPEG encoder, up to float rounding between batch sizes
        ok, jpeg = cv2.imencode('.jpg', np.ascontiguousarray(expected[n][:, :, ::-1]))
        difference = np.abs(cv2.imread(str(folder / f'{n:06d}.jpg')).astype(int)
                            - cv2.imdecode(jpeg, cv2.IMREAD_COLOR).astype(int))
        assert difference.max() <= 8 and difference.mean() < 0.02

    before = files_of(folder)
    assert run_script('run_fine_tuned_generator.py', *stage6) == 0  # a rerun writes nothing
    assert files_of(folder) == before
    other = [a if a != inputs['genforce'] else inputs['v1'] for a in stage6]
    assert run_script('run_fine_tuned_generator.py', *other, '--outdir', tmp_path / 'other') == 2
    assert 'is not the base generator' in capsys.readouterr().err and not (tmp_path / 'other').exists()
    missing = [*stage6, '--directions', tmp_path / 'none.pt', '--outdir', tmp_path / 'none']
    assert run_script('run_fine_tuned_generator.py', *missing) == 2
    assert 'no such directions file; make it with find_attribute_directions.py' in capsys.readouterr().err


def test_the_evaluation_measures_the_directions(inputs, tmp_path, stand_in, capsys):
    """evaluate_attribute_control.py --model directions: loaded through the shared registry, keyed on both files."""
    from ohlora.layout import Layout

    root = tmp_path / 'root'
    assert run_script(SCRIPT, *args(inputs, root, '--num', '40', '--chunk-size', '20', '--batch-size', '10')) == 0
    evaluation = ['--model', 'directions', '--weights', inputs['genforce'], '--property-cnn', inputs['cnn'],
                  '--root', root, '--device', 'cpu', '--no-progress', '--num', '1', '--grid', 'eyes=-1,1',
                  '--grid', 'mouth=0', '--grid', 'pose=0', '--no-identity', '--no-shares']
    assert run_script('evaluate_attribute_control.py', *evaluation) == 0
    assert 'were fitted with the property CNN' not in capsys.readouterr().err  # the same CNN: no warning
    folder = Layout(root).attribute_control_dir('directions', 'property-cnn')
    summary = json.loads((folder / 'summary.json').read_text())
    assert summary['run']['model'] == 'directions' and summary['run']['measure'] == 'property-cnn'
    record = json.loads((folder / 'evaluation_settings.json').read_text())
    text = json.dumps(record)
    assert sha256_of(Layout(root).attribute_directions) in text and sha256_of(inputs['genforce']) in text
    assert run_script('evaluate_attribute_control.py', *evaluation, '--directions', tmp_path / 'none.pt') == 2
    assert 'no such directions file' in capsys.readouterr().err

    torch.manual_seed(5)
    torch.save(PropertyScoreCNN().state_dict(), tmp_path / 'other_cnn.pth')
    other = [a if a != inputs['cnn'] else tmp_path / 'other_cnn.pth' for a in evaluation]
    assert run_script('evaluate_attribute_control.py', *other, '--outdir', tmp_path / 'other') == 0
    err = capsys.readouterr().err
    assert (f'warning: the directions were fitted with the property CNN cnn.pth (SHA-256 '
            f'{sha256_of(inputs["cnn"])[:12]}…), but another one measures them (SHA-256 '
            f'{sha256_of(tmp_path / "other_cnn.pth")[:12]}…)') in err, err
