"""Stage 5 v3 (run_stylegan_fine_tuning_v3.py): the tiny v1 generator of the reference data as the decoder, a random
full-size property CNN and gender CNN (both read 256x256 images, the tiny generator's size), four drawn images.

At batch 2 an epoch is 2 steps. The two expensive runs (a fresh 2-epoch run with a permissive test, and the same
run stopped by SIGTERM inside epoch 1 and resumed) are made once per module; everything else is a unit test, a
run refused before training, or a run whose steps are replaced by known losses.
"""
import hashlib
from dataclasses import asdict
import json
import logging
import os
import re
import shutil
import signal
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from cnn.models import GenderCNN
from ohlora import atomic, layout as layout_module
from ohlora.errors import PipelineError
from ohlora.layout import SCORE_COLUMNS, Layout, V3Outputs
from ohlora.owned_files import OwnedFiles
from ohlora.resume import load_resume_record
from ohlora.schedules import cosine_lr
from rerun_helpers import assert_refused, descendants, kill_a_worker_after_the_stop, sigterm_group_when
from script_runner import files_of, run_script
from stylegan_modified import cvae_training
from stylegan_modified.attribute_metrics import UPSTREAM_V3_RULE, grid_labels
from stylegan_modified.checkpoint import load_conditional_generator, load_cvae_encoder
from stylegan_modified.cvae_encoder import reparameterize
from stylegan_modified.cvae_training import (LOG_COLUMNS, CVAETrainer, EpochOutputs, StepLosses, V3Settings)
from stylegan_modified.datasets import epoch_order
from stylegan_modified.generation import read_z_csv
from stylegan_modified.property_score_cnn import PropertyScoreCNN
from stylegan_modified.v3_epoch_test import EpochTestResult, EpochTestSettings, MuLogvarHistory, run_epoch_test
from stylegan_modified.v3_inputs import build_v3_models, check_labels_cnn, load_gender_cnn
from test_training_toolkit import write_images

SCRIPT = 'run_stylegan_fine_tuning_v3.py'
IMG_NOS = [4, 7, 11, 20]
GRID = 'eyes=-1.8,1.8;pose=-1.2,1.2'
PERMISSIVE = ['--pass-min-r', 'eyes=-1,mouth=-1,pose=-1', '--pass-max-mae', 'eyes=none,mouth=none,pose=none']
DETERMINISTIC_COLUMNS = [c for c in LOG_COLUMNS if c not in ('images_per_s', 'peak_gpu_mem_mb')]


def write_scores(path, img_nos, seed=0):
    """all_scores_v2_cnn.csv as upstream wrote it: no index column, img_path, 4 decimals, not re-normalised."""
    scores = np.random.default_rng(seed).normal(size=(len(img_nos), 7)).round(4)
    frame = pd.DataFrame(scores, columns=SCORE_COLUMNS)
    frame.insert(0, 'img_path', [f'C:\\Users\\x\\{n:06d}.jpg' for n in img_nos])
    frame.insert(0, 'img_no', img_nos)
    atomic.write_csv(path, frame)
    return scores


@pytest.fixture(scope='module', autouse=True)
def real_shipped_files_untouched():
    """Whatever this module does, the z CSVs shipped beside the real code keep their bytes."""
    folder = layout_module.CODE_ROOT / 'stylegan_modified'
    before = {p.name: p.read_bytes() for p in sorted(folder.glob('test_z_vector_*.csv'))}
    assert set(before) >= {'test_z_vector_0005.csv', 'test_z_vector_0007.csv'}
    yield
    assert {p.name: p.read_bytes() for p in sorted(folder.glob('test_z_vector_*.csv'))} == before


@pytest.fixture(scope='module')
def inputs(reference_dir, tmp_path_factory):
    """The three weights files: the tiny v1 generator, a random property CNN and gender CNN (full size)."""
    folder = tmp_path_factory.mktemp('v3_inputs')
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    torch.save(tiny['state_dicts']['v1_generator'], folder / 'v1.pth')
    torch.save(tiny['state_dicts']['v3_generator'], folder / 'v3.pth')
    torch.manual_seed(11)
    torch.save(PropertyScoreCNN().state_dict(), folder / 'property_cnn.pth')
    torch.save(GenderCNN().state_dict(), folder / 'gender_model_0.pt')
    return {'v1': folder / 'v1.pth', 'v3': folder / 'v3.pth', 'property': folder / 'property_cnn.pth',
            'gender': folder / 'gender_model_0.pt'}


@pytest.fixture(scope='module')
def template(tmp_path_factory):
    """A root with the filtered images and all_scores_v2_cnn.csv."""
    root = tmp_path_factory.mktemp('v3_template')
    layout = Layout(root)
    write_images(layout, IMG_NOS)
    write_scores(layout.property_cnn_scores_csv, IMG_NOS)
    return root


def new_root(template, tmp_path, name='root'):
    root = tmp_path / name
    shutil.copytree(template, root)
    return root


def weights_args(inputs):
    return ['--v1-weights', inputs['v1'], '--property-cnn', inputs['property'], '--gender-cnn', inputs['gender']]


def args(root, inputs, *extra, permissive=True):
    root_args = [] if root is None else ['--root', root]
    return [*root_args, *weights_args(inputs), '--batch-size', 2, '--workers', 0, '--test-z', 2, '--test-grid', GRID,
            '--test-random', 1, '--device', 'cpu', '--no-progress', *(PERMISSIVE if permissive else []), *extra]


def outputs(root):
    return V3Outputs(Layout(root).training_run('v3'))


def state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def log_frame(root):
    return pd.read_csv(outputs(root).files.train_log)


@pytest.fixture(scope='module')
def fresh(template, inputs, tmp_path_factory):
    """--epochs 2 in one go, every test z passing (permissive thresholds)."""
    root = new_root(template, tmp_path_factory.mktemp('fresh'))
    assert run_script(SCRIPT, *args(root, inputs, '--epochs', 2)) == 0
    return root


def test_fresh_run_writes_checkpoints_z_vectors_tests_log_and_final_files(fresh, inputs):
    out = outputs(fresh)
    generator = load_conditional_generator(out.final_generator, 'v3')
    encoder = load_cvae_encoder(out.final_encoder)
    assert generator.label_convert_dim == 24 and generator.z_space_dim == 32 and encoder.latent_dim == 32
    assert list(state(out.final_generator))[0] == 'mapping.label_weight'  # upstream key order, no wrapper prefix

    log = log_frame(fresh)
    assert list(log.columns) == list(LOG_COLUMNS)
    assert log[['epoch', 'idx']].values.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    total = log['property_loss'] + log['gender_loss'] + 0.2 * log['mu_loss'] + 0.05 * log['logvar_loss']
    np.testing.assert_allclose(log['total_loss'], total, rtol=1e-6)
    assert log['lr_generator'].tolist() == [1e-4, 1e-4, cosine_lr(1e-4, 1), cosine_lr(1e-4, 1)]
    np.testing.assert_allclose(log['lr_encoder'], log['lr_generator'] / 10, rtol=1e-12)
    ends = log.groupby('epoch').tail(1)
    assert ends['passing_z'].tolist() == [2, 2] and log['passing_z'].isna().sum() == 2
    np.testing.assert_allclose(ends['epoch_mean_loss'], log.groupby('epoch')['total_loss'].mean(), rtol=1e-12)

    for epoch, best in zip((0, 1), ends['best_z'].astype(int)):
        gen, enc, z_csv = out.epoch_files(epoch)
        assert list(state(gen)) == list(state(out.final_generator)) and list(state(enc)) == list(encoder.state_dict())
        folder = out.epoch_test(epoch)
        zs = pd.read_csv(folder.zs_csv)
        assert list(zs.columns) == [str(k) for k in range(32)] and len(zs) == 2
        # the z CSV is exactly the best z of the test (what stage 6 reads back as float32)
        assert np.array_equal(read_z_csv(z_csv, 32).astype(np.float32), zs.iloc[best].to_numpy(np.float32))
        each = pd.read_csv(folder.result_each_z_csv)
        assert list(each.columns) == ['z_idx', 'passed', 'eyes_corr', 'mouth_corr', 'pose_corr', 'eyes_mse',
                                      'mouth_mse', 'pose_mse', 'eyes_mae', 'mouth_mae', 'pose_mae']
        assert each['passed'].tolist() == ['O', 'O'] and (each['mouth_corr'] == 0).all()  # mouth not in the grid
        mus = pd.read_csv(folder.mus_csv)
        assert len(mus) == 2 and np.array_equal(mus.to_numpy(), mus.to_numpy().round(4))  # both batches, 4 decimals
        result = pd.read_csv(folder.z_result_csv(best))
        assert len(result) == 4 and sorted(p.name for p in folder.z_dir(best).glob('*.jpg')) == [
            '000.jpg', '001.jpg', '002.jpg', '003.jpg']
        assert result[['eyes_label', 'pose_label']].values.tolist() == [[-1.8, -1.2], [-1.8, 1.2], [1.8, -1.2],
                                                                        [1.8, 1.2]]  # eyes outer, pose inner
        random = pd.read_csv(folder.random_result_csv)
        assert len(random) == 1 and random['background_std_label'].tolist() == [0.0]
        assert random['gender_score'].between(0, 1).all()
    # the last epoch's checkpoint is the final state
    assert all(torch.equal(v, state(out.final_generator)[k]) for k, v in state(out.epoch_checkpoint(1, 'gen')).items())

    options = json.loads(out.files.options_json.read_text())
    assert options['options']['hyper']['generator_lr'] == 1e-4 and options['options']['hyper']['encoder_lr'] == 1e-5
    assert options['options']['pass_rule'] == {'eyes': [-1.0, None], 'mouth': [-1.0, None], 'pose': [-1.0, None]}
    assert set(options['options']['inputs']) == {'property_cnn_sha256', 'gender_cnn_sha256'}
    assert options['provenance']['v1_file'] == 'v1.pth'
    assert str(fresh) not in out.files.options_json.read_text()
    record = load_resume_record(out.files.resume_record)
    assert (record.epoch, record.batch, record.step) == (2, 0, 4) and len(record.extra['history']['mu']) == 0


def test_init_from_v1_and_only_the_mapping_and_encoder_move(fresh, inputs):
    v1 = state(inputs['v1'])
    cpu_state = torch.get_rng_state()
    generator, encoder = build_v3_models(inputs['v1'], seed=0)
    assert torch.equal(torch.get_rng_state(), cpu_state)  # the init draws from its own generator
    again, _ = build_v3_models(inputs['v1'], seed=0)
    other, other_encoder = build_v3_models(inputs['v1'], seed=1)
    initial = generator.state_dict()
    assert initial['mapping.dense0.weight'].shape == (32, 32 + 24) and initial['mapping.label_weight'].shape == (7, 24)
    for key in ('mapping.dense0.weight', 'mapping.label_weight'):
        assert torch.equal(initial[key], again.state_dict()[key]) and not torch.equal(initial[key],
                                                                                       other.state_dict()[key])
    for key, value in initial.items():  # everything else is v1's (dense0.bias and dense1-7 included)
        if key not in ('mapping.dense0.weight', 'mapping.label_weight'):
            assert torch.equal(value, v1[key]), key
    assert not torch.equal(encoder.fc2_mu.weight, other_encoder.fc2_mu.weight)

    trained = state(outputs(fresh).final_generator)
    for key, before in initial.items():
        if key.startswith('mapping.'):
            assert (before != trained[key]).float().mean() > 0.9, key  # every mapping tensor moved
        elif key == 'truncation.w_avg':
            assert not torch.equal(before, trained[key])  # the train-mode G call's moving average, as upstream
        else:
            assert torch.equal(before, trained[key]), key  # synthesis frozen
    trained_encoder = state(outputs(fresh).final_encoder)
    for key, before in encoder.state_dict().items():
        assert not torch.equal(before, trained_encoder[key]), key


@pytest.fixture(scope='module')
def trainer_parts(inputs):
    generator, encoder = build_v3_models(inputs['v1'], seed=0)
    property_cnn = cvae_training.load_property_cnn(inputs['property'])
    return generator, encoder, property_cnn, load_gender_cnn(inputs['gender'])


def make_trainer(trainer_parts, **settings):
    import copy

    parts = [copy.deepcopy(p) for p in trainer_parts]
    return CVAETrainer(*parts, V3Settings(epochs=1, **settings), torch.device('cpu'))


def batch(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 256, 256, generator=gen) * 2 - 1, torch.randn(n, 7, generator=gen)


def test_the_loss_is_the_spec_formula_and_the_cnns_stay_frozen_in_eval_mode(trainer_parts):
    trainer = make_trainer(trainer_parts)
    assert not trainer.property_cnn.training and not trainer.gender_cnn.training
    assert all(not p.requires_grad for p in trainer.property_cnn.parameters())
    assert all(not p.requires_grad for p in trainer.gender_cnn.parameters())
    assert all(p.requires_grad == n.startswith('mapping.') for n, p in trainer.generator.named_parameters())
    assert [g['lr'] for g in trainer.optimizer.param_groups] == [1e-4, 1e-5]
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g['params']) == sum(
        p.numel() for n, p in trainer.generator.named_parameters() if n.startswith('mapping.')) + sum(
        p.numel() for p in trainer.encoder.parameters())

    images, labels = batch()
    seen = {}
    trainer.property_cnn.register_forward_pre_hook(lambda m, a: seen.update(property=a[0].detach()))
    trainer.gender_cnn.register_forward_pre_hook(lambda m, a: seen.update(gender=a[0].detach()))
    torch.manual_seed(5)
    terms, mu, logvar = trainer.losses(images, labels)
    assert torch.equal(seen['gender'], (seen['property'] + 1) / 2)  # the gender CNN's [0, 1] range
    with torch.no_grad():  # the same eps, by hand
        torch.manual_seed(5)
        mu2, logvar2 = trainer.encoder(images, labels)
        z = reparameterize(mu2, logvar2, torch.randn(mu2.shape))
        image = trainer.generator(z, labels, style_mixing_prob=0.0, trunc_psi=1.0, randomize_noise=False)['image']
        scores, gender = trainer.property_cnn(image), trainer.gender_cnn((image + 1) / 2)
    mses = [((scores[:, k] - labels[:, k]) ** 2).mean() for k in (0, 3, 4)]
    expected = {'property_loss': sum(mses) / 3, 'gender_loss': ((gender - 1) ** 2).mean(),
                'mu_loss': (mu2 ** 2).mean(), 'logvar_loss': (logvar2 ** 2).mean()}
    expected['total_loss'] = (expected['property_loss'] + expected['gender_loss'] + 0.2 * expected['mu_loss']
                              + 0.05 * expected['logvar_loss'])
    for name, value in expected.items():
        assert torch.allclose(terms[name].detach(), value, rtol=1e-5, atol=1e-7), name

    frozen = {k: v.clone() for k, v in {**trainer.property_cnn.state_dict(), **{
        'g.' + k: v for k, v in trainer.gender_cnn.state_dict().items()}}.items()}
    synthesis = {k: v.clone() for k, v in trainer.generator.state_dict().items() if k.startswith('synthesis.')}
    trainer.step(images, labels)
    after = {**trainer.property_cnn.state_dict(), **{'g.' + k: v for k, v in trainer.gender_cnn.state_dict().items()}}
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert all(torch.equal(v, trainer.generator.state_dict()[k]) for k, v in synthesis.items())
    assert len(trainer.history) == 1


def test_a_step_reads_its_values_from_the_device_in_one_copy(trainer_parts, monkeypatch):
    """float() / .item() of a CUDA tensor each wait for the GPU: a step reads its five losses and the history's
    mu / logvar rows in one .cpu() copy, and they are the values float() gives."""
    trainer, reference = make_trainer(trainer_parts), make_trainer(trainer_parts)
    images, labels = batch()
    eps = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    terms, mu, logvar = reference.losses(images, labels, eps)
    reads = []

    def counted(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            # not torch's own (AdamW reads its CPU step counters), nor the lod read once per value
            if '/torch/' not in caller.co_filename and caller.co_name != 'scalar_buffer':
                reads.append(name)
            return original(self, *args, **kwargs)
        return read

    for name in ('item', '__float__', 'cpu', 'tolist', 'numpy'):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    losses = trainer.step(images, labels, eps)
    monkeypatch.undo()
    assert reads == ['cpu', 'tolist']  # before: five float() calls (and two .to('cpu') of the history rows)
    assert asdict(losses) == {name: float(value) for name, value in terms.items()}
    mus, logvars = trainer.history.tensors()
    assert torch.equal(mus[0], mu[0].detach()) and torch.equal(logvars[0], logvar[0].detach())


def test_compat_upstream_feeds_the_raw_image_in_train_mode_with_upstreams_lr_curve(trainer_parts):
    trainer = make_trainer(trainer_parts, compat='upstream')
    assert trainer.property_cnn.training and trainer.gender_cnn.training  # dropout on, as upstream
    images = torch.full((1, 3, 256, 256), -0.5)
    assert torch.equal(trainer.gender_input(images), images)
    assert trainer.set_epoch(10) == [0.0, 0.0]  # upstream's zero-LR epoch
    default = make_trainer(trainer_parts)
    assert default.set_epoch(10) == [1e-4, 1e-5] and torch.equal(default.gender_input(images), images * 0 + 0.25)


def test_amp_step_runs_in_bfloat16_on_cpu(trainer_parts):
    trainer = make_trainer(trainer_parts, amp=True)
    losses = trainer.step(*batch(1))
    assert trainer.amp.enabled and trainer.amp.dtype == torch.bfloat16
    assert np.isfinite(list(vars(losses).values())).all()
    assert all(p.dtype == torch.float32 for p in trainer.generator.parameters())


def test_history_keeps_the_first_sample_of_the_last_100_batches():
    history = MuLogvarHistory()
    for k in range(105):
        history.add(torch.full((3, 4), float(k)), torch.full((3, 4), -float(k)))
    mu, logvar = history.tensors()
    assert mu.shape == (100, 4) and mu[0, 0] == 5 and mu[-1, 0] == 104 and logvar[-1, 0] == -104
    copy = MuLogvarHistory()
    copy.load_state_dict(history.state_dict())
    assert torch.equal(copy.tensors()[0], mu)
    empty = MuLogvarHistory()
    empty.load_state_dict(MuLogvarHistory().state_dict())
    assert len(empty) == 0


class CodeGenerator(torch.nn.Module):
    """A stand-in generator whose image carries its inputs: pixel (0, 0, j) = label j, pixel (1, 0, 0) = z[0]."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, z, label, trunc_psi=None, trunc_layers=None, randomize_noise=False):
        self.calls.append((self.training, len(z)))
        image = torch.zeros(len(z), 3, 256, 256)
        image[:, 0, 0, :7] = label
        image[:, 1, 0, 0] = z[:, 0]
        return {'image': image}


def planted_scores(images):
    """Measured = requested, except per z (z[0] = its index): 1 constant eyes, 2 eyes + 0.30004, 3 eyes inverted,
    4 pose halved."""
    labels, which = images[:, 0, 0, :7].double(), images[:, 1, 0, 0].round().long()
    scores = labels.clone()
    scores[which == 1, 0] = 0.5
    scores[which == 2, 0] += 0.30004  # rounded to 4 decimals: + 0.3
    scores[which == 3, 0] *= -1
    scores[which == 4, 4] *= 0.5
    return scores


def test_the_epoch_test_computes_r_mae_and_pass_exactly(tmp_path):
    history = MuLogvarHistory()
    for k in range(-1, 5):  # six batches; the last five rows give z 0..4 with sigma ~ 0
        history.add(torch.full((2, 3), float(k)), torch.full((2, 3), -400.0))  # exp(-200) is 0 in float32
    generator = CodeGenerator().train()
    grid = {'mouth': (-1.2, 1.6), 'eyes': (-1.8, 1.8), 'pose': (-1.2, 0.0, 1.2)}
    settings = EpochTestSettings(num_z=5, grid=grid, num_random=3, batch_size=7, seed=0)
    folder = V3Outputs(Layout(tmp_path).training_run('v3')).epoch_test(3)
    result = run_epoch_test(generator, planted_scores, lambda images: torch.full((len(images), 1), 0.81234),
                            history, epoch=3, settings=settings, folder=folder)
    assert generator.training and all(not training for training, _ in generator.calls)  # eval during the test
    assert max(n for _, n in generator.calls) == 7  # in batches
    assert result.zs[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    labels = grid_labels(grid, np.float64)
    eyes, pose = labels[:, 0], labels[:, 4]

    r = result.metrics.r  # columns eyes, mouth, pose
    np.testing.assert_allclose(r, [[1, 1, 1], [0, 1, 1], [1, 1, 1], [-1, 1, 1], [1, 1, 1]], atol=1e-12)
    assert r[1, 0] == 0.0  # zero variance of the measured eyes: exactly 0, not NaN
    mae = result.metrics.mae
    np.testing.assert_allclose(mae[:, 0], [0, np.abs(eyes - 0.5).mean(), 0.3, 2 * np.abs(eyes).mean(), 0], atol=1e-12)
    np.testing.assert_allclose(mae[:, 2], [0, 0, 0, 0, 0.5 * np.abs(pose).mean()], atol=1e-12)
    np.testing.assert_allclose(result.metrics.mse[:, 0], [0, ((eyes - 0.5) ** 2).mean(), 0.09, 4 * (eyes ** 2).mean(),
                                                          0], atol=1e-12)
    # upstream rule: eyes r >= 0.77 & MAE <= 1.0, pose MAE <= 1.4 (pose halved: MAE 0.4 passes)
    assert result.passed.tolist() == [True, False, True, False, True]
    assert result.best == 0  # mean r ties at 1 (z 0, 2, 4): lowest summed MAE
    strict = EpochTestSettings(num_z=5, grid=grid, num_random=0, seed=0,
                               rule=UPSTREAM_V3_RULE.with_thresholds(max_mae={'pose': 0.3}))
    assert run_epoch_test(CodeGenerator(), planted_scores, planted_scores, history, 3, strict).passed.tolist() == [
        True, False, True, False, False]

    each = pd.read_csv(folder.result_each_z_csv)
    assert each['passed'].tolist() == ['O', 'X', 'O', 'X', 'O'] and each['eyes_corr'].tolist()[1] == 0.0
    assert pd.read_csv(folder.zs_csv)['0'].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert pd.read_csv(folder.mus_csv)['0'].tolist() == [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0]  # every stored row
    z2 = pd.read_csv(folder.z_result_csv(2))
    assert len(z2) == 12 and np.allclose(z2['eyes_score'], z2['eyes_label'] + 0.3)
    assert len(list(folder.z_dir(4).glob('*.jpg'))) == 12
    random = pd.read_csv(folder.random_result_csv)
    assert random['gender_score'].tolist() == [0.8123] * 3 and (random['background_std_label'] == 0).all()
    assert len(list(folder.random_dir.glob('*.jpg'))) == 3


def test_only_passing_epochs_write_and_the_z_csv_is_the_exact_z(tmp_path):
    out = V3Outputs(Layout(tmp_path).training_run('v3'))
    epoch_outputs = EpochOutputs(out, OwnedFiles(out.files.written_files, base=out.files.outdir))
    zs = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    none = EpochTestResult(4, zs, np.zeros((2, 7)), np.zeros((3, 2, 7)), None, np.zeros(3, bool), None,
                           np.zeros((0, 7)), np.zeros((0, 7)), np.zeros(0))
    assert epoch_outputs.write(4, none, {'w': torch.ones(1)}, {'e': torch.ones(1)}) == ()
    assert not out.files.outdir.exists()
    some = EpochTestResult(4, zs, np.zeros((2, 7)), np.zeros((3, 2, 7)), None, np.array([False, True, True]), 2,
                           np.zeros((0, 7)), np.zeros((0, 7)), np.zeros(0))
    gen, enc, z_csv = epoch_outputs.write(4, some, {'w': torch.ones(1)}, {'e': torch.ones(1)})
    assert (gen.name, enc.name, z_csv.name) == ('stylegan_gen_fine_tuned_v3_ckpt_0004_gen.pth',
                                                'stylegan_gen_fine_tuned_v3_ckpt_0004_enc.pth',
                                                'test_z_vector_0004.csv')
    assert z_csv.read_text().splitlines()[0] == ','.join(str(k) for k in range(32))
    assert np.array_equal(read_z_csv(z_csv, 32).astype(np.float32), zs[2].numpy())


def test_the_checkpoint_and_z_of_a_passing_epoch_load_in_stage_6(fresh, tmp_path):
    out = outputs(fresh)
    assert run_script('run_fine_tuned_generator.py', '--model', 'v3', '--weights', out.epoch_checkpoint(1, 'gen'),
                      '--z-csv', out.test_z_csv(1), '--root', tmp_path / 'out', '--num', 2, '--device', 'cpu',
                      '--no-progress') == 0
    assert sorted(p.name for p in Layout(tmp_path / 'out').final_inference_dir('v3').glob('*.jpg')) == [
        '000000.jpg', '000001.jpg']


def test_sigterm_inside_an_epoch_then_resume_equals_the_uninterrupted_run(template, inputs, fresh, tmp_path,
                                                                          monkeypatch, capsys):
    root = new_root(template, tmp_path)
    original, steps = CVAETrainer.step, []

    def step_then_signal(self, images, labels):
        result = original(self, images, labels)
        steps.append(1)
        if len(steps) == 3:  # the first batch of epoch 1: the history of epoch 1 holds one row
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(CVAETrainer, 'step', step_then_signal)
    assert run_script(SCRIPT, *args(root, inputs, '--epochs', 2)) == 130
    assert 'stopped by SIGTERM at epoch 1, batch 1 (step 3)' in capsys.readouterr().err
    record = load_resume_record(outputs(root).files.resume_record)
    assert (record.epoch, record.batch, record.step) == (1, 1, 3) and record.extra['history']['mu'].shape == (1, 32)
    assert not outputs(root).final_generator.exists()  # written after the last epoch only
    monkeypatch.setattr(CVAETrainer, 'step', original)
    assert run_script(SCRIPT, *args(root, inputs, '--epochs', 2)) == 2  # without --resume: refused
    assert 'pass --resume to continue it' in capsys.readouterr().err
    assert run_script(SCRIPT, *args(root, inputs, '--epochs', 2, '--resume')) == 0
    assert_same_run(fresh, root)


def assert_same_run(fresh, root):
    a, b = files_of(fresh / 'stylegan_modified'), files_of(root / 'stylegan_modified')
    assert sorted(a) == sorted(b)
    options = 'fine_tuning_v3/training_options.json'
    skip = {'fine_tuning_v3/train_log_v3.csv', 'fine_tuning_v3/resume_record.pt', options}
    different = [name for name in a if name not in skip and a[name] != b[name]]
    assert different == []  # checkpoints, z CSVs, every test CSV and image, the final files: byte for byte
    recorded = [json.loads(files[options]) for files in (a, b)]
    for record in recorded:
        for name in ('workers', 'checkpoint_every'):  # they do not change the results
            record['options'].pop(name)
    assert recorded[0] == recorded[1]
    pd.testing.assert_frame_equal(log_frame(fresh)[DETERMINISTIC_COLUMNS], log_frame(root)[DETERMINISTIC_COLUMNS])
    ra, rb = (load_resume_record(outputs(r).files.resume_record) for r in (fresh, root))
    assert torch.equal(ra.rng['torch_cpu'], rb.rng['torch_cpu'])
    assert {k: v for k, v in ra.extra.items() if k != 'history'} == {k: v for k, v in rb.extra.items()
                                                                      if k != 'history'}
    for index, values in ra.optimizers['cvae']['state'].items():
        for key, tensor in values.items():
            assert torch.equal(tensor, rb.optimizers['cvae']['state'][index][key])


def test_a_worker_killed_by_the_stop_signal_is_the_stop(template, inputs, fresh, tmp_path, monkeypatch, capsys):
    """The worker of epoch 1's second batch dies of the group's SIGTERM (it had not yet ignored it) while batch 0
    trains: the step ends, the stop writes its checkpoint, and --resume equals the uninterrupted run."""
    root = new_root(template, tmp_path)
    fatal = int(epoch_order(0, 1, len(IMG_NOS))[2])
    kill_a_worker_after_the_stop(monkeypatch, CVAETrainer, '(step 2)', fatal, tmp_path / 'armed')
    run_args = args(root, inputs, '--epochs', 2, '--workers', 2)
    assert run_script(SCRIPT, *run_args) == 130
    err = capsys.readouterr().err
    assert err.startswith('stopped by SIGTERM at epoch 1, batch 1 (step 3)') and err.count('\n') == 1, err
    monkeypatch.undo()
    assert run_script(SCRIPT, *run_args, '--resume') == 0
    assert_same_run(fresh, root)


def test_a_worker_killed_during_the_epoch_test_after_the_stop(template, inputs, fresh, tmp_path, monkeypatch,
                                                             capsys):
    """The group's SIGTERM during epoch 0's test, which runs while the epoch's loader (and its workers) still
    lives, and one of those workers dies of it: the test and the epoch's checkpoint complete, then the stop."""
    root = new_root(template, tmp_path)
    original = cvae_training.run_epoch_test

    def test_under_signal(*test_args, **kwargs):
        if test_args[4] == 0:  # the epoch
            workers = descendants(os.getpid())
            assert workers, 'no DataLoader worker alive during the epoch test'
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(workers[0], signal.SIGKILL)
            time.sleep(0.5)  # its SIGCHLD arrives during the test (before the fix: a RuntimeError right here)
        return original(*test_args, **kwargs)

    monkeypatch.setattr(cvae_training, 'run_epoch_test', test_under_signal)
    run_args = args(root, inputs, '--epochs', 2, '--workers', 2)
    assert run_script(SCRIPT, *run_args) == 130
    err = capsys.readouterr().err
    assert err.startswith('stopped by SIGTERM at epoch 1, batch 0 (step 2)') and err.count('\n') == 1, err
    monkeypatch.undo()
    assert run_script(SCRIPT, *run_args, '--resume') == 0
    assert_same_run(fresh, root)


@pytest.mark.slow
def test_a_sigterm_to_the_process_group_stops_cleanly_and_resumes_exactly(template, inputs, fresh, tmp_path):
    root = new_root(template, tmp_path)
    run_args = args(root, inputs, '--epochs', 2, '--workers', 2, '--checkpoint-every', 1)
    status, err, left = sigterm_group_when(SCRIPT, run_args, outputs(root).files.resume_record.exists)
    assert status == 130 and re.fullmatch(r'stopped by SIGTERM at epoch \d, batch \d \(step [1-3]\); the '
                                          r'checkpoint is complete; continue with --resume\n', err), err
    assert left == []
    assert run_script(SCRIPT, *run_args, '--resume') == 0
    assert_same_run(fresh, root)


def test_a_plain_rerun_of_a_finished_run_writes_nothing(fresh, inputs, capsys):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in fresh.rglob('*') if p.is_file()}
    assert run_script(SCRIPT, *args(fresh, inputs, '--epochs', 2)) == 0
    assert 'already holds a finished run of 2 epochs; nothing to do' in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in fresh.rglob('*') if p.is_file()} == before


def fake_steps(monkeypatch, losses):
    """Steps that cost nothing: known total losses, one history row each."""
    values = iter(losses)

    def step(self, images, labels):
        total = next(values)
        self.history.add(torch.zeros(1, 32), torch.zeros(1, 32))
        return StepLosses(total, total, 0.0, 0.0, 0.0)

    monkeypatch.setattr(CVAETrainer, 'step', step)


def test_patience_stops_when_the_epoch_loss_stops_improving(template, inputs, tmp_path, monkeypatch, capsys):
    root = new_root(template, tmp_path)
    fake_steps(monkeypatch, [1.0, 1.0, 0.5, 0.5, 0.7, 0.7, 0.6, 0.6] + [9.0] * 20)
    run_args = args(root, inputs, '--epochs', 10, '--patience', 2, '--test-z', 1, '--test-grid', 'eyes=-1,1',
                    '--test-random', 0, permissive=False)
    assert run_script(SCRIPT, *run_args) == 0
    assert 'fine-tuned v3 for 4 epochs (stopped early by --patience)' in capsys.readouterr().out
    log = log_frame(root)
    assert log['epoch'].max() == 3 and log['epoch_mean_loss'].dropna().tolist() == [1.0, 0.5, 0.7, 0.6]
    assert outputs(root).final_generator.is_file()
    before = files_of(root)
    assert run_script(SCRIPT, *run_args, '--resume') == 0  # nothing left to do, with or without --resume
    assert 'stopped early by --patience' in capsys.readouterr().out
    assert files_of(root) == before


def test_tf32_is_on_for_the_steps_and_off_for_the_epoch_test(template, inputs, tmp_path, monkeypatch):
    root = new_root(template, tmp_path)
    fake_steps(monkeypatch, [1.0, 1.0])
    seen, step, test = [], CVAETrainer.step, cvae_training.run_epoch_test

    def flags(what):
        seen.append((what, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    monkeypatch.setattr(CVAETrainer, 'step', lambda *a: (flags('step'), step(*a))[1])
    monkeypatch.setattr(cvae_training, 'run_epoch_test', lambda *a, **k: (flags('test'), test(*a, **k))[1])
    assert run_script(SCRIPT, *args(root, inputs, '--epochs', 1, '--tf32')) == 0
    assert seen == [('step', True, True), ('step', True, True), ('test', False, False)]
    assert json.loads(outputs(root).files.options_json.read_text())['options']['tf32'] is True


def test_a_nan_loss_stops_in_one_line_before_the_optimiser_step(template, inputs, tmp_path, monkeypatch, capsys):
    root = new_root(template, tmp_path)
    original = CVAETrainer.losses

    def nan_loss(self, images, labels):
        terms, mu, logvar = original(self, images, labels)
        return {**terms, 'total_loss': terms['total_loss'] * float('nan')}, mu, logvar

    monkeypatch.setattr(CVAETrainer, 'losses', nan_loss)
    assert run_script(SCRIPT, *args(root, inputs, '--epochs', 1)) == 2
    assert capsys.readouterr().err.strip() == ('error: loss became nan at epoch 0, batch 0 (step 1); stopped before '
                                               'the optimiser step, no checkpoint had been written yet')
    assert not outputs(root).files.resume_record.exists() and not outputs(root).final_generator.exists()


@pytest.fixture
def code_root(template, tmp_path, monkeypatch):
    """A copy of the code root with the two shipped z CSVs (and the data), as the default root."""
    real = layout_module.CODE_ROOT
    code = new_root(template, tmp_path, 'code')
    (code / 'stylegan_modified').mkdir()
    for name in ('test_z_vector_0005.csv', 'test_z_vector_0007.csv'):
        shutil.copy(real / 'stylegan_modified' / name, code / 'stylegan_modified' / name)
    monkeypatch.setattr(layout_module, 'CODE_ROOT', code)
    return code


def test_the_shipped_z_csvs_are_never_written_even_with_overwrite(code_root, inputs, capsys):
    shipped = code_root / 'stylegan_modified' / 'test_z_vector_0005.csv'
    assert Layout().root == code_root  # no --root: the (copied) code root
    before = files_of(code_root)
    for extra in ([], ['--overwrite']):
        assert run_script(SCRIPT, *args(None, inputs, '--epochs', 6, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count('\n') == 0 and err.startswith(f'error: {shipped} ships with the code and is never overwritten')
        assert 'epoch 5' in err and '--root or --outdir' in err
        assert files_of(code_root) == before
    elsewhere = V3Outputs(Layout().training_run('v3', code_root / 'mine'))  # another --outdir: no shipped names
    EpochOutputs(elsewhere, OwnedFiles(elsewhere.files.written_files, elsewhere.files.outdir)).check(range(8), False)


def test_the_real_shipped_files_stay_untouched():
    folder = layout_module.CODE_ROOT / 'stylegan_modified'
    shipped = {name: (folder / name).read_bytes() for name in ('test_z_vector_0005.csv', 'test_z_vector_0007.csv')}
    outs = V3Outputs(Layout().training_run('v3'))
    with pytest.raises(PipelineError, match='ships with the code'):
        EpochOutputs(outs, OwnedFiles(outs.files.written_files, outs.files.outdir)).check(range(4, 8), overwrite=True)
    assert {name: (folder / name).read_bytes() for name in shipped} == shipped


def test_a_published_checkpoint_is_never_overwritten_without_overwrite(template, inputs, tmp_path, capsys):
    root = new_root(template, tmp_path)
    published = outputs(root).epoch_checkpoint(5, 'gen')
    atomic.write_bytes(published, b'the downloaded v3 generator of epoch 5')
    before = files_of(root)
    assert run_script(SCRIPT, *args(root, inputs, '--epochs', 6)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f'error: {published} exists and was not written by this run (a downloaded or another run\'s file?); '
                   'it is never overwritten: choose another --root or --outdir, or pass --overwrite to replace it')
    assert files_of(root) == before
    outs = outputs(root)
    epoch_outputs = EpochOutputs(outs, OwnedFiles(outs.files.written_files, outs.files.outdir))
    epoch_outputs.check(range(0, 5), overwrite=False)  # epochs 0-4 do not touch it
    epoch_outputs.check(range(0, 6), overwrite=True)   # --overwrite lets the run replace it


class MeanScores(torch.nn.Module):
    """A stand-in property CNN for the scoring pass: 7 values per image."""

    def forward(self, images):
        return images.mean(dim=(2, 3)).repeat(1, 3)[:, :7]


def scored_by(template, tmp_path, cnn_sha256):
    """A root whose all_scores_v2_cnn.csv was written by v2's scoring pass, its record naming ``cnn_sha256`` (the
    CNN of the v2 run stylegan_modified/fine_tuning_v2_cnn)."""
    from stylegan_modified.datasets import ScoredImageDataset
    from stylegan_modified.property_cnn_scoring import ScoringPass
    from test_training_toolkit import upstream_scores_csv

    root = new_root(template, tmp_path)
    layout = Layout(root)
    layout.property_cnn_scores_csv.unlink()
    upstream_scores_csv(layout.property_scores_csv(2), IMG_NOS)
    scoring = ScoringPass(layout, ScoredImageDataset.filtered(layout, layout.property_scores_csv(2)),
                          device=torch.device('cpu'))
    source = {'file': 'stylegan_modified/stylegan_gen_fine_tuned_v2_cnn.pth',
              'run': 'stylegan_modified/fine_tuning_v2_cnn'}
    scoring.run(MeanScores(), cnn_sha256, source)
    return root


def test_labels_of_another_property_cnn_are_refused(template, inputs, tmp_path, capsys, caplog):
    """v2's scoring record names the CNN that scored all_scores_v2_cnn.csv: a run that would train on its labels
    but compute its loss and test with another CNN is refused in one line naming both and the ways out."""
    other = 'ab' * 32
    root = scored_by(template, tmp_path, other)
    err = assert_refused(capsys, root, SCRIPT, *args(root, inputs, '--epochs', 1),
                         match='all_scores_v2_cnn.csv was scored by another property CNN (the CNN of the v2 run '
                               'stylegan_modified/fine_tuning_v2_cnn (stylegan_modified/'
                               'stylegan_gen_fine_tuned_v2_cnn.pth), SHA-256 abababababababab…) than the one this '
                               'run trains and tests with')
    mine = hashlib.sha256(inputs['property'].read_bytes()).hexdigest()
    assert f'{inputs["property"]}, SHA-256 {mine[:16]}…' in err
    assert err.endswith('pass --property-cnn with the CNN that scored it, or --scores CSV to choose the labels '
                        'yourself')
    assert not outputs(root).files.folder.exists()

    layout = Layout(root)
    csv = layout.property_cnn_scores_csv
    check_labels_cnn(layout, csv, False, inputs['property'], other)  # the CNN that scored them: no objection
    with caplog.at_level(logging.INFO, logger='stylegan_modified.v3_inputs'):
        check_labels_cnn(layout, csv, True, inputs['property'], mine)  # --scores given: the user's choice
        assert [r.levelname for r in caplog.records] == ['WARNING']
        assert 'training on these labels as asked' in caplog.records[0].getMessage()
        caplog.clear()
        csv.write_bytes(csv.read_bytes() + b'\n')  # no longer the CSV the record describes (e.g. upstream's)
        check_labels_cnn(layout, csv, False, inputs['property'], mine)
        assert [r.levelname for r in caplog.records] == ['INFO'] and 'has no scoring record' in caplog.text


@pytest.fixture(scope='module')
def bad_files(inputs, tmp_path_factory):
    folder = tmp_path_factory.mktemp('v3_bad')
    v1 = state(inputs['v1'])
    v1['mapping.dense3.bias'][0] = float('nan')
    torch.save(v1, folder / 'v1_nan.pth')
    return {'v1_nan': folder / 'v1_nan.pth'}


def edit_scores(root, edit):
    path = Layout(root).property_cnn_scores_csv
    atomic.write_csv(path, edit(pd.read_csv(path)))


@pytest.mark.parametrize('case, message', [
    ('v3 as v1', r'v3.pth is an Oh-LoRA v3 generator \(label_weight 7x24, z width 32\), not the Oh-LoRA v1 generator'),
    ('nan v1', r'v1_nan.pth holds NaN or infinite values \(mapping.dense3.bias\)'),
    ('gender as property', r'gender_model_0.pt is an Oh-LoRA gender CNN, not the Oh-LoRA v2 property-score CNN'),
    ('property as gender', r'property_cnn.pth is the Oh-LoRA v2 property-score CNN .*not the Oh-LoRA gender CNN of '
                           r'fold 0'),
    ('missing column', r'all_scores_v2_cnn.csv lacks the column\(s\) mouth_score'),
    ('nan', r'all_scores_v2_cnn.csv has empty or NaN values in column pose_score'),
    ('no image', r'000099.jpg does not exist'),
    ('no scores', r'all_scores_v2_cnn.csv does not exist: run run_stylegan_fine_tuning_v2.py first .*or pass --scores'),
    ('no v1', r'--v1-weights .*missing.pth: no such file'),
    ('no default v1', r'stylegan_gen_fine_tuned_v1.pth does not exist .*or pass --v1-weights PATH; stage 5 v1 '
                      r'\(run_stylegan_fine_tuning.py\) makes it'),
    ('grid', r"--test-grid 'eyes=1': .*gives 1 label"),
    ('threshold', r"--pass-min-r 'smile=0.5': each part is ATTRIBUTE=VALUE"),
    ('test z', r'--test-z 101: the test draws its z from the last 100 batches'),
    ('resume nothing', r'there is no run to resume'),
])
def test_bad_input_is_one_line_before_anything_is_written(template, inputs, bad_files, tmp_path, capsys, case,
                                                          message):
    root = new_root(template, tmp_path)
    files = dict(inputs)
    extra = []
    if case == 'v3 as v1':
        files['v1'] = inputs['v3']
    elif case == 'nan v1':
        files['v1'] = bad_files['v1_nan']
    elif case == 'gender as property':
        files['property'] = inputs['gender']
    elif case == 'property as gender':
        files['gender'] = inputs['property']
    elif case == 'missing column':
        edit_scores(root, lambda f: f.drop(columns=['mouth_score']))
    elif case == 'nan':
        edit_scores(root, lambda f: f.assign(pose_score=[0.1, None, 0.3, 0.4]))
    elif case == 'no image':
        edit_scores(root, lambda f: f.assign(img_no=[4, 7, 11, 99]))
    elif case == 'no scores':
        Layout(root).property_cnn_scores_csv.unlink()
    elif case == 'no v1':
        files['v1'] = tmp_path / 'missing.pth'
    elif case == 'grid':
        extra = ['--test-grid', 'eyes=1']
    elif case == 'threshold':
        extra = ['--pass-min-r', 'smile=0.5']
    elif case == 'test z':
        extra = ['--test-z', 101]
    elif case == 'resume nothing':
        extra = ['--resume']
    run_args = args(root, files, '--epochs', 1, *extra)
    if case == 'no default v1':
        at = run_args.index('--v1-weights')
        del run_args[at:at + 2]
    before = files_of(root)
    assert run_script(SCRIPT, *run_args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith('error: ')
    assert re.search(message, err), err
    assert files_of(root) == before
    assert not outputs(root).files.folder.exists()


def test_help_has_examples_and_the_options(capsys):
    assert run_script(SCRIPT, '--help') == 0
    text = capsys.readouterr().out
    for option in ('--root', '--device', '--batch-size', '--seed', '--no-progress', '--compat', '--resume',
                   '--overwrite', '--amp', '--epochs', '--patience', '--v1-weights', '--property-cnn', '--gender-cnn',
                   '--scores', '--test-z', '--test-grid', '--pass-min-r', '--pass-max-mae', '--test-random'):
        assert option in text
    assert 'examples:' in text and '--resume' in text


def test_a_test_grid_holding_a_judged_attribute_constant_is_warned_about(caplog):
    """r of a constant request is 0, so with eyes held at one value and the rule's r >= 0.77 no z can ever pass (no
    epoch is saved as passing): said before the run starts; a grid that varies every judged attribute, or a rule
    that does not need r > 0 for the constant one, says nothing."""
    with caplog.at_level(logging.WARNING, logger='stylegan_modified.cvae_training'):
        V3Settings(epochs=1, test_grid={'mouth': [-1.2, 1.6], 'eyes': [1.8], 'pose': [0.0, 1.2]}).check()
        assert [r.getMessage().split(',')[0] for r in caplog.records] == [
            '--test-grid holds eyes constant']
        caplog.clear()
        V3Settings(epochs=1).check()
        V3Settings(epochs=1, test_grid={'mouth': [-1.2, 1.6], 'eyes': [1.8], 'pose': [0.0, 1.2]},
                   pass_min_r={'eyes': 0.0}).check()
        assert caplog.records == []
