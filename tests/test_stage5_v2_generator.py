"""Stage 5 v2, the opt-in generator phase (--train-generator): the tiny v1 generator of the reference data trained
through a property CNN (a seeded random one given with --property-cnn, so no CNN is trained here except in one
end-to-end test), 2 z per step, 2 steps per step group."""
import json
import os
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch

from ohlora.layout import Layout
from ohlora.records import sha256_of
from ohlora.resume import load_resume_record
from ohlora.schedules import cosine_lr
from script_runner import files_of, run_script
from stylegan_modified.checkpoint import load_conditional_generator
from stylegan_modified.fine_tuning_v2 import state_sha256
from stylegan_modified.property_cnn_training import new_property_cnn
from stylegan_modified.stylegan_generator import StyleGANGeneratorForV2
from stylegan_modified.v2_generator_training import (LOG_COLUMNS, V2GeneratorSettings, _GeneratorTrainer,
                                                     curriculum_batch, fixed_batch, rerandomise_dense0, v2_generator)
from test_training_toolkit import upstream_scores_csv, write_images

SCRIPT = 'run_stylegan_fine_tuning_v2.py'
IMG_NOS = [4, 7, 11, 20]
TIMING = ['images_per_s', 'peak_gpu_mem_mb']


@pytest.fixture(scope='module')
def inputs(reference_dir, tmp_path_factory):
    """A template root (images, all_scores_v2.csv), the tiny v1 G and a seeded random property CNN."""
    folder = tmp_path_factory.mktemp('v2_generator_inputs')
    root = folder / 'template'
    write_images(Layout(root), IMG_NOS)
    upstream_scores_csv(Layout(root).property_scores_csv(2), IMG_NOS, seed=2)
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    torch.save(tiny['state_dicts']['v1_generator'], folder / 'v1.pth')
    torch.save(new_property_cnn(seed=5).state_dict(), folder / 'cnn.pth')
    torch.save(new_property_cnn(seed=6).state_dict(), folder / 'other_cnn.pth')
    return {'template': root, 'v1': folder / 'v1.pth', 'cnn': folder / 'cnn.pth', 'other_cnn': folder / 'other_cnn.pth'}


def new_root(inputs, tmp_path, name='root'):
    root = tmp_path / name
    shutil.copytree(inputs['template'], root)
    return root


def args(root, inputs, *extra, cnn='cnn'):
    return ['--root', root, '--property-cnn', inputs[cnn], '--train-generator', '--v1-weights', inputs['v1'],
            '--gen-batch-size', 2, '--steps-per-group', 2, '--eval-batch-size', 4, '--workers', 0, '--device', 'cpu',
            '--no-progress', *extra]


def run_files(root):
    return Layout(root).training_run('v2')


def output(root):
    return Layout(root).fine_tuned('stylegan_gen_fine_tuned_v2.pth')


def state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def fresh(inputs, tmp_path_factory):
    root = new_root(inputs, tmp_path_factory.mktemp('fresh'))
    assert run_script(SCRIPT, *args(root, inputs, '--max-groups', 2)) == 0
    return root


def test_fresh_run_writes_the_best_group_and_a_step_log(fresh, inputs):
    generator = load_conditional_generator(output(fresh), 'v2')
    assert isinstance(generator, StyleGANGeneratorForV2) and generator.z_space_dim == 32
    log = pd.read_csv(run_files(fresh).train_log)
    assert list(log.columns) == list(LOG_COLUMNS)
    assert log[['group', 'idx', 'step']].values.tolist() == [[0, 0, 0], [0, 1, 1], [1, 0, 2], [1, 1, 3]]
    assert log['mix'].tolist() == [1.0, 1.0, 0.9, 0.9]
    assert log['lr'].tolist() == [1e-05, 1e-05, cosine_lr(1e-05, 1, 20), cosine_lr(1e-05, 1, 20)]
    group_loss = log['group_loss'].tolist()
    assert np.isnan(group_loss[0]) and np.isnan(group_loss[2])
    assert group_loss[1] == pytest.approx(log['loss'][:2].mean())
    assert group_loss[3] == pytest.approx(log['loss'][2:].mean())
    best = int(np.nanargmin(group_loss) // 2)
    assert log['best_group'].tolist()[-1] == best
    record = load_resume_record(run_files(fresh).resume_record)
    assert (record.epoch, record.batch, record.step) == (2, 0, 4) and 'property_cnn' not in record.models
    assert all(torch.equal(v, record.models['best_generator'][k]) for k, v in state(output(fresh)).items())
    options = json.loads(run_files(fresh).options_json.read_text())
    assert options['options']['property_cnn'] == sha256_of(inputs['cnn'])
    assert options['options']['hyper'] == {'lr': 1e-05, 'weight_decay': 0.01, 'cosine_period': 20,
                                           'curriculum_decay': 0.9}
    assert options['provenance']['v1_sha256'] == sha256_of(inputs['v1'])
    assert str(fresh) not in run_files(fresh).options_json.read_text()


def test_every_generator_parameter_trains_and_v1_dense0_is_kept(fresh, inputs):
    v1 = state(inputs['v1'])
    trained = load_resume_record(run_files(fresh).resume_record).models['generator']
    generator = v2_generator(v1, 'v1')
    # At lod 0 only the last ToRGB layer (output6) draws the image: output0-5 get no gradient and stay.
    unused = {f'synthesis.output{k}.{p}' for k in range(6) for p in ('weight', 'bias')}
    parameters = {n for n, _ in generator.named_parameters()} - unused
    assert list(trained) == list(v1) and len(unused & set(v1)) == 12
    for name, before in v1.items():
        moved = not torch.equal(before, trained[name])
        assert moved == (name in parameters or name == 'truncation.w_avg'), name  # w_avg: train mode, as upstream
    # the start was v1 itself, dense0 included (upstream re-randomised it: compat only)
    settings = V2GeneratorSettings(batch_size=2)
    start = v2_generator(v1, 'v1')
    assert torch.equal(start.mapping.dense0.weight, v1['mapping.dense0.weight'])
    rerandomise_dense0(start, seed=0)
    again = v2_generator(v1, 'v1')
    rerandomise_dense0(again, seed=0)
    assert torch.equal(start.mapping.dense0.weight, again.mapping.dense0.weight)  # seeded
    assert not torch.equal(start.mapping.dense0.weight, v1['mapping.dense0.weight'])
    # randn / lr_mul, as the constructor draws it
    assert float(start.mapping.dense0.weight.detach().std()) == pytest.approx(1 / 0.01, rel=0.1)
    others = {k: v for k, v in start.state_dict().items() if k != 'mapping.dense0.weight'}
    assert all(torch.equal(v, v1[k]) for k, v in others.items())
    assert settings.schedule == 'restarts'


def test_the_cnn_is_frozen_in_eval_mode_by_default_and_trains_along_in_compat(inputs):
    v1 = state(inputs['v1'])
    z, y = torch.randn(2, 32), torch.randn(2, 7)
    for compat in (None, 'upstream'):
        cnn = new_property_cnn(seed=5)
        before = {k: v.clone() for k, v in cnn.state_dict().items()}
        trainer = _GeneratorTrainer(v2_generator(v1, 'v1'), cnn, V2GeneratorSettings(batch_size=2, compat=compat),
                                    torch.device('cpu'))
        trainer.set_lr(0)
        loss = trainer.step(z, y)
        assert np.isfinite(loss)
        moved = [k for k, v in cnn.state_dict().items() if not torch.equal(v, before[k])]
        if compat is None:
            assert not cnn.training and moved == [] and not any(p.requires_grad for p in cnn.parameters())
        else:
            assert cnn.training and len(moved) == len(before)  # every CNN tensor trained (dropout on)
            assert 'property_cnn' in trainer.record({}, 0, 1, 1).models


def test_the_curriculum_moves_from_the_fixed_batch_to_fresh_noise():
    z_fixed, y_fixed = fixed_batch(seed=0, batch_size=3, z_dim=8, label_size=7)
    assert torch.equal(fixed_batch(0, 3, 8, 7)[0], z_fixed) and y_fixed.shape == (3, 7)
    z, y, mix = curriculum_batch(z_fixed, y_fixed, seed=0, step=5, group=0)
    assert mix == 1.0 and torch.equal(z, z_fixed) and torch.equal(y, y_fixed)
    z2, y2, mix2 = curriculum_batch(z_fixed, y_fixed, seed=0, step=7, group=2)
    assert mix2 == pytest.approx(0.81)
    z_new = (z2 - 0.81 * z_fixed) / 0.19
    assert torch.allclose(z_new, curriculum_batch(torch.zeros(3, 8), torch.zeros(3, 7), 0, 7, 2)[0] / 0.19, atol=1e-5)
    assert torch.equal(curriculum_batch(z_fixed, y_fixed, 0, 7, 2)[0], z2)  # the draws of a step depend on it alone
    assert not torch.equal(curriculum_batch(z_fixed, y_fixed, 0, 8, 2)[0], z2)


def test_sigterm_mid_group_and_resume_equal_the_uninterrupted_run(inputs, fresh, tmp_path, monkeypatch, capsys):
    root = new_root(inputs, tmp_path)
    assert run_script(SCRIPT, *args(root, inputs, '--max-groups', 1)) == 0
    original, steps = _GeneratorTrainer.step, []

    def step_then_signal(self, z, y):
        loss = original(self, z, y)
        steps.append(1)
        if len(steps) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(_GeneratorTrainer, 'step', step_then_signal)
    assert run_script(SCRIPT, *args(root, inputs, '--max-groups', 2, '--resume')) == 130
    assert 'stopped by SIGTERM at step group 1, step 1 (step 3 in all)' in capsys.readouterr().err
    monkeypatch.setattr(_GeneratorTrainer, 'step', original)
    assert run_script(SCRIPT, *args(root, inputs, '--max-groups', 2)) == 2
    assert 'unfinished run (1 step groups and 1 steps of 2); pass --resume' in capsys.readouterr().err
    assert run_script(SCRIPT, *args(root, inputs, '--max-groups', 2, '--resume')) == 0
    assert output(root).read_bytes() == output(fresh).read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(run_files(root).train_log).drop(columns=TIMING),
                                  pd.read_csv(run_files(fresh).train_log).drop(columns=TIMING))
    ra = load_resume_record(run_files(root).resume_record)
    rb = load_resume_record(run_files(fresh).resume_record)
    assert all(torch.equal(v, rb.models['generator'][k]) for k, v in ra.models['generator'].items())
    assert torch.equal(ra.rng['torch_cpu'], rb.rng['torch_cpu'])


def test_a_finished_run_writes_nothing_and_another_cnn_is_refused(fresh, inputs, capsys):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in fresh.rglob('*') if p.is_file()}
    assert run_script(SCRIPT, *args(fresh, inputs, '--max-groups', 2)) == 0
    assert 'v2 generator: 2 step groups (already trained, nothing to do)' in capsys.readouterr().out
    assert run_script(SCRIPT, *args(fresh, inputs, '--max-groups', 2, cnn='other_cnn')) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and "holds another run (property_cnn: '" in err
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in fresh.rglob('*') if p.is_file()} == before


def test_generator_early_stopping(inputs, tmp_path, monkeypatch, capsys):
    root = new_root(inputs, tmp_path)
    losses = iter([3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 5.0, 5.0])

    def scripted(self, z, y):
        value = next(losses)
        self.extra['group_loss_sum'] = self.extra.get('group_loss_sum', 0.0) + value
        return value

    monkeypatch.setattr(_GeneratorTrainer, 'step', scripted)
    assert run_script(SCRIPT, *args(root, inputs, '--max-groups', 10, '--gen-patience', 2)) == 0
    assert 'v2 generator: 4 step groups (early stopping); best group 1 (mean loss 1.0000)' in capsys.readouterr().out
    log = pd.read_csv(run_files(root).train_log)
    assert log['group_loss'].dropna().tolist() == [3.0, 1.0, 2.0, 5.0]
    assert load_resume_record(run_files(root).resume_record).stopped_early


def test_cnn_then_generator_in_one_call(inputs, tmp_path, capsys):
    """Without --property-cnn the generator trains through the CNN this call has just trained."""
    root = new_root(inputs, tmp_path)
    run_args = ['--root', root, '--train-generator', '--v1-weights', inputs['v1'], '--max-epochs', 1,
                '--batch-size', 3, '--max-groups', 1, '--steps-per-group', 1, '--gen-batch-size', 2, '--workers', 0,
                '--device', 'cpu', '--no-progress']
    assert run_script(SCRIPT, *run_args) == 0
    out = capsys.readouterr().out
    assert 'property CNN: 1 epochs' in out and 'scores of 4 images: wrote' in out
    assert 'v2 generator: 1 step groups' in out
    layout = Layout(root)
    cnn_path = layout.fine_tuned('stylegan_gen_fine_tuned_v2_cnn.pth')
    options = json.loads(run_files(root).options_json.read_text())['options']
    assert options['property_cnn'] == sha256_of(cnn_path) == state_sha256(state(cnn_path))
    assert json.loads(layout.property_cnn_scoring_record.read_text())['inputs']['property_cnn_sha256'] == \
        sha256_of(cnn_path)
    before = files_of(root)
    assert run_script(SCRIPT, *run_args) == 0  # every phase complete: nothing written
    assert files_of(root) == before


def test_the_saved_generator_renders_in_stage_6_as_a_v1_layout_file(fresh, tmp_path):
    z = np.random.default_rng(1).standard_normal(32)
    pd.DataFrame([z], columns=[str(k) for k in range(32)]).to_csv(tmp_path / 'z.csv', index=False)
    assert run_script('run_fine_tuned_generator.py', '--model', 'v1', '--weights', output(fresh), '--z-csv',
                      tmp_path / 'z.csv', '--root', tmp_path / 'out', '--num', 2, '--device', 'cpu',
                      '--no-progress') == 0
    assert sorted(p.name for p in Layout(tmp_path / 'out').final_inference_dir('v1').glob('*.jpg')) == [
        '000000.jpg', '000001.jpg']
