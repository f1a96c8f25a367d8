"""Stage 5 v2 (run_stylegan_fine_tuning_v2.py), the property-CNN phase and the scoring pass, on four drawn 256x256
images (3 train, 1 validation; batch 2: 2 steps per epoch) and the real PropertyScoreCNN.

The expensive runs (a fresh 2-epoch run, the same run split by --max-epochs 1 + SIGTERM inside epoch 1 +
--resume) are made once per module. Early stopping, the cap and the LR curves are tested with the training step
and the validation replaced by scripted stand-ins (the loop, the logs and the files stay real).
"""
import hashlib
import json
import os
import re
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.io import read_image

from ohlora import atomic
from ohlora.layout import PROPERTY_NAMES, SCORE_COLUMNS, Layout
from ohlora.resume import load_resume_record
from ohlora.schedules import cosine_lr
from rerun_helpers import assert_refused, kill_a_worker_after_the_stop, sigterm_group_when
from script_runner import files_of, run_script
from stylegan_modified import property_cnn_training
from stylegan_modified.checkpoint import load_property_cnn
from ohlora.devices import tf32
from stylegan_modified.datasets import ScoredImageDataset, epoch_order
from stylegan_modified.property_cnn_scoring import score_dataset
from stylegan_modified.property_cnn_training import (LOG_COLUMNS, VALIDATION_LOG_COLUMNS, EarlyStopping,
                                                     PropertyCnnSettings, _CnnTrainer, new_property_cnn,
                                                     train_validation_split, validation_metrics)
from stylegan_modified.property_score_cnn import PropertyScoreCNN
from test_training_toolkit import upstream_scores_csv, write_images

SCRIPT = 'run_stylegan_fine_tuning_v2.py'
IMG_NOS = [20, 4, 11, 7]  # deliberately unsorted: the CSVs come out sorted by img_no
CNN_FILE = 'stylegan_gen_fine_tuned_v2_cnn.pth'
TIMING = ('images_per_s', 'peak_gpu_mem_mb')


@pytest.fixture(scope='module')
def template(tmp_path_factory):
    """A root with the stage-2 filtered images and the stage-4 all_scores_v2.csv (upstream form)."""
    root = tmp_path_factory.mktemp('stage5_v2_template')
    layout = Layout(root)
    write_images(layout, IMG_NOS)
    upstream_scores_csv(layout.property_scores_csv(2), IMG_NOS, seed=2)
    return root


def new_root(template, tmp_path, name='root'):
    root = tmp_path / name
    shutil.copytree(template, root)
    return root


def args(root, *extra):
    return ['--root', root, '--batch-size', 2, '--eval-batch-size', 2, '--workers', 0, '--device', 'cpu',
            '--no-progress', *extra]


def run_files(root):
    return Layout(root).training_run('v2_cnn')


def published(root):
    return Layout(root).fine_tuned(CNN_FILE)


def csvs(root):
    layout = Layout(root)
    return layout.property_cnn_scores_csv, layout.property_cnn_compare_csv


def state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_run(root_a, root_b):
    assert published(root_a).read_bytes() == published(root_b).read_bytes()
    fa, fb = run_files(root_a), run_files(root_b)
    log_a, log_b = pd.read_csv(fa.train_log), pd.read_csv(fb.train_log)
    pd.testing.assert_frame_equal(log_a.drop(columns=list(TIMING)), log_b.drop(columns=list(TIMING)))
    assert fa.validation_log.read_bytes() == fb.validation_log.read_bytes()
    for a, b in zip(csvs(root_a), csvs(root_b)):
        assert a.read_bytes() == b.read_bytes()
    ra, rb = load_resume_record(fa.resume_record), load_resume_record(fb.resume_record)
    assert (ra.epoch, ra.batch, ra.step) == (rb.epoch, rb.batch, rb.step)
    for name in ra.models:
        assert all(torch.equal(v, rb.models[name][k]) for k, v in ra.models[name].items()), name
    for index, values in ra.optimizers['property_cnn']['state'].items():
        for key, tensor in values.items():
            assert torch.equal(tensor, rb.optimizers['property_cnn']['state'][index][key]), (index, key)
    assert torch.equal(ra.rng['torch_cpu'], rb.rng['torch_cpu'])
    assert ra.extra['train_loss_sum'] == rb.extra['train_loss_sum']


@pytest.fixture(scope='module')
def fresh(template, tmp_path_factory):
    """--max-epochs 2 in one go."""
    root = new_root(template, tmp_path_factory.mktemp('fresh'))
    assert run_script(SCRIPT, *args(root, '--max-epochs', 2)) == 0
    return root


def test_fresh_run_writes_the_best_cnn_both_logs_and_options(fresh):
    model = load_property_cnn(published(fresh))  # the published name, loads strictly with weights_only
    assert isinstance(model, PropertyScoreCNN)
    files = run_files(fresh)
    log = pd.read_csv(files.train_log)
    assert list(log.columns) == list(LOG_COLUMNS) and log['epoch'].tolist() == [0, 1]
    assert list(LOG_COLUMNS[:2]) == ['epoch', 'valid_loss'] and LOG_COLUMNS[8] == 'back_std_score_loss'
    # the early-stopping value is upstream's (7 * valid_loss - back_std_loss) / 6
    assert np.allclose(log['valid_loss_no_back_std'], (7 * log['valid_loss'] - log['back_std_score_loss']) / 6)
    assert log['lr'].tolist() == [5e-05, cosine_lr(5e-05, 1)]
    best = int(log['valid_loss_no_back_std'].idxmin())
    assert log['best_epoch'].tolist()[-1] == best
    assert np.isfinite(log['train_loss']).all() and log['peak_gpu_mem_mb'].isna().all()

    val_log = pd.read_csv(files.validation_log)
    assert list(val_log.columns) == list(VALIDATION_LOG_COLUMNS)
    assert val_log['epoch'].tolist() == [0, 1]  # one validation image here (at most 30 per epoch)
    _, val_idx = train_validation_split(len(IMG_NOS), seed=0)
    val_img_no = IMG_NOS[int(val_idx[0])]
    assert val_log['img_no'].tolist() == [val_img_no, val_img_no]
    labels = pd.read_csv(Layout(fresh).property_scores_csv(2), index_col=0).set_index('img_no')
    assert val_log['eyes_score_label'].tolist() == [labels.loc[val_img_no, 'eyes_score']] * 2

    options = json.loads(files.options_json.read_text())
    assert options['options']['epochs'] == 2 and options['options']['patience'] == 20
    assert options['options']['hyper'] == {'lr': 5e-05, 'weight_decay': 0.01, 'cosine_period': 10}
    assert options['options']['schedule'] == 'restarts' and options['options']['data']['train'] == 3
    assert str(fresh) not in files.options_json.read_text()

    record = load_resume_record(files.resume_record)
    assert (record.epoch, record.batch, record.step) == (2, 0, 4)
    assert record.extra['early_stopping']['best_epoch'] == best
    assert set(record.extra['best_metrics']) == set(PROPERTY_NAMES)
    published_state = state(published(fresh))
    assert all(torch.equal(v, record.models['best_property_cnn'][k]) for k, v in published_state.items())


def test_every_cnn_parameter_trains(fresh):
    initial = new_property_cnn(seed=0).state_dict()
    trained = load_resume_record(run_files(fresh).resume_record).models['property_cnn']
    assert list(trained) == list(initial)
    for name, before in initial.items():
        assert not torch.equal(before, trained[name]), name
    assert torch.equal(new_property_cnn(seed=0).state_dict()['eyes_score_cnn.conv1.0.weight'],
                       initial['eyes_score_cnn.conv1.0.weight'])  # the init is seeded
    assert not torch.equal(new_property_cnn(seed=1).state_dict()['eyes_score_cnn.conv1.0.weight'],
                           initial['eyes_score_cnn.conv1.0.weight'])


def reference_scores(model, root):
    """The CNN's eval-mode scores of each image, computed here independently of the scoring code."""
    layout = Layout(root)
    model.eval()
    scores = {}
    with torch.no_grad():
        for no in IMG_NOS:
            image = read_image(str(layout.filtered_image(no))).float() / 255
            scores[no] = model(((image - 0.5) / 0.5)[None])[0].numpy()
    return scores


def test_the_csvs_have_the_upstream_format_and_the_cnn_scores(fresh):
    scores_csv, compare_csv = csvs(fresh)
    lines = scores_csv.read_text().splitlines()
    assert lines[0] == 'img_no,img_path,' + ','.join(SCORE_COLUMNS)  # no index column
    assert [int(line.split(',')[0]) for line in lines[1:]] == sorted(IMG_NOS)
    assert lines[1].split(',')[1] == 'stylegan/synthesize_results_filtered/000004.jpg'  # relative, POSIX
    for line in lines[1:] + compare_csv.read_text().splitlines()[1:]:
        for value in line.split(',')[2:]:
            assert re.fullmatch(r'-?\d+(\.\d{1,4})?', value), value  # 4 decimals at most
    header = compare_csv.read_text().splitlines()[0].split(',')
    assert header[:5] == ['img_no', 'img_path', 'eyes_v2', 'eyes_v2_cnn', 'eyes_diff']
    assert header[-3:] == ['background_std_v2', 'background_std_v2_cnn', 'background_std_diff'] and len(header) == 23

    expected = reference_scores(load_property_cnn(published(fresh)), fresh)
    frame = pd.read_csv(scores_csv).set_index('img_no')
    compare = pd.read_csv(compare_csv).set_index('img_no')
    v2 = pd.read_csv(Layout(fresh).property_scores_csv(2), index_col=0).set_index('img_no')
    for no in IMG_NOS:
        # batch 2 there, 1 here: the float32 sums may differ in the last bits, so allow one rounding step
        assert np.abs(frame.loc[no, list(SCORE_COLUMNS)].to_numpy() - expected[no]).max() <= 0.5e-4 + 1e-6
        for k, name in enumerate(PROPERTY_NAMES):
            cnn, label = frame.loc[no, SCORE_COLUMNS[k]], v2.loc[no, SCORE_COLUMNS[k]]
            assert compare.loc[no, f'{name}_v2_cnn'] == cnn and compare.loc[no, f'{name}_v2'] == label
            assert compare.loc[no, f'{name}_diff'] == round(abs(label - cnn), 4)


def test_a_plain_rerun_writes_nothing(fresh, capsys):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in fresh.rglob('*') if p.is_file()}
    assert run_script(SCRIPT, *args(fresh, '--max-epochs', 2)) == 0
    out = capsys.readouterr().out
    assert 'property CNN: 2 epochs (already trained, nothing to do)' in out and 'are up to date' in out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in fresh.rglob('*') if p.is_file()} == before


def test_extension_and_sigterm_mid_epoch_resume_equal_the_uninterrupted_run(template, fresh, tmp_path, monkeypatch,
                                                                           capsys):
    root = new_root(template, tmp_path)
    assert run_script(SCRIPT, *args(root, '--max-epochs', 1)) == 0
    assert load_resume_record(run_files(root).resume_record).epoch == 1
    first_csv = csvs(root)[0].read_bytes()  # scored by the 1-epoch CNN
    original, steps = _CnnTrainer.step, []

    def step_then_signal(self, images, labels):
        loss = original(self, images, labels)
        steps.append(1)
        if len(steps) == 1:  # the first batch of epoch 1: the stop comes inside an epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(_CnnTrainer, 'step', step_then_signal)
    assert run_script(SCRIPT, *args(root, '--max-epochs', 2, '--resume')) == 130
    err = capsys.readouterr().err
    assert 'stopped by SIGTERM at epoch 1, batch 1 (step 3)' in err and 'continue with --resume' in err
    record = load_resume_record(run_files(root).resume_record)
    assert (record.epoch, record.batch, record.step) == (1, 1, 3) and record.data_order is not None
    assert csvs(root)[0].read_bytes() == first_csv  # the CSVs come after the CNN phase
    monkeypatch.setattr(_CnnTrainer, 'step', original)
    assert run_script(SCRIPT, *args(root, '--max-epochs', 2)) == 2  # no --resume: refused
    assert 'unfinished run (1 epochs and 1 batches of 2); pass --resume' in capsys.readouterr().err
    assert run_script(SCRIPT, *args(root, '--max-epochs', 2, '--resume', '--patience', 5)) == 2
    assert '(patience: 20 -> 5); only --max-epochs, --device' in capsys.readouterr().err
    assert run_script(SCRIPT, *args(root, '--max-epochs', 2, '--resume')) == 0
    assert_same_run(fresh, root)


# --- early stopping, the cap and the LR curves, with scripted losses ---
@pytest.mark.parametrize('where', ['training', 'validation'])
def test_a_worker_killed_by_the_stop_signal_is_the_stop(template, fresh, tmp_path, monkeypatch, capsys, where):
    """A worker that the group's SIGTERM kills before it could ignore it: in epoch 1's training (its second batch,
    while the first trains) or in epoch 1's validation. Either way a checkpoint of what is done, status 130, and
    --resume (which then validates) equals the uninterrupted run."""
    root = new_root(template, tmp_path)
    train, validation = train_validation_split(len(IMG_NOS), seed=0)
    if where == 'training':
        fatal, armed, position = int(train[epoch_order(0, 1, len(train))][2]), '(step 2)', (1, 1, 3)
    else:
        fatal, armed, position = int(validation[0]), '(step 4)', (1, 2, 4)
    kill_a_worker_after_the_stop(monkeypatch, _CnnTrainer, armed, fatal, tmp_path / 'armed')
    run_args = args(root, '--max-epochs', 2, '--workers', 2)
    assert run_script(SCRIPT, *run_args) == 130
    err = capsys.readouterr().err
    assert err.startswith('stopped by SIGTERM at epoch {}, batch {} (step {})'.format(*position)), err
    assert err.count('\n') == 1, err
    record = load_resume_record(run_files(root).resume_record)
    assert (record.epoch, record.batch, record.step) == position
    monkeypatch.undo()
    assert run_script(SCRIPT, *run_args, '--resume') == 0
    assert_same_run(fresh, root)


@pytest.mark.slow
def test_a_sigterm_to_the_process_group_stops_cleanly_and_resumes_exactly(template, fresh, tmp_path):
    root = new_root(template, tmp_path)
    run_args = args(root, '--max-epochs', 2, '--workers', 2, '--checkpoint-every', 1)
    status, err, left = sigterm_group_when(SCRIPT, run_args, run_files(root).resume_record.exists)
    assert status == 130 and re.match(r'stopped by SIGTERM at epoch \d, batch \d \(step [1-4]\)', err), err
    assert err.count('\n') == 1 and left == [], err
    assert run_script(SCRIPT, *run_args, '--resume') == 0
    assert_same_run(fresh, root)


def scripted(monkeypatch, values):
    """The training step only nudges one bias (so each epoch's weights differ) and validation reports
    ``values[epoch]`` as the loss of every property."""
    def step(self, images, labels):
        with torch.no_grad():
            self.model.eyes_score_cnn.fc_final.bias += 1.0
        self.extra['train_loss_sum'] += float(len(labels))
        self.extra['train_images'] += len(labels)
        return 1.0

    def validate(self, batches):
        labels, indices = [], []
        for items in batches:
            labels.append(items['label'].numpy())
            indices.append(items['index'].numpy())
        labels = np.concatenate(labels)
        epoch = int(self.extra.setdefault('scripted_epoch', 0))
        self.extra['scripted_epoch'] = epoch + 1
        outputs = labels + np.sqrt(values[epoch])
        return validation_metrics(outputs, labels), outputs, labels, np.concatenate(indices)

    monkeypatch.setattr(_CnnTrainer, 'step', step)
    monkeypatch.setattr(_CnnTrainer, 'validate', validate)


def test_early_stopping_keeps_the_best_epoch_and_finishes_the_run(template, tmp_path, monkeypatch, capsys):
    root = new_root(template, tmp_path)
    scripted(monkeypatch, [1.0, 0.5, 0.6, 0.5, 0.4])
    assert run_script(SCRIPT, *args(root, '--max-epochs', 10, '--patience', 2)) == 0
    assert 'property CNN: 4 epochs (early stopping); best epoch 1' in capsys.readouterr().out
    log = pd.read_csv(run_files(root).train_log)
    assert log['epoch'].tolist() == [0, 1, 2, 3] and log['best_epoch'].tolist() == [0, 1, 1, 1]
    assert np.allclose(log['valid_loss_no_back_std'], [1.0, 0.5, 0.6, 0.5])  # a tie is no improvement
    # the published weights are epoch 1's: 2 steps per epoch, each adding 1 to the bias
    initial = new_property_cnn(0).eyes_score_cnn.fc_final.bias
    assert torch.allclose(state(published(root))['eyes_score_cnn.fc_final.bias'], initial + 4)
    record = load_resume_record(run_files(root).resume_record)
    assert record.stopped_early and record.completes(10) and record.completes(1000)

    before = files_of(root)
    assert run_script(SCRIPT, *args(root, '--max-epochs', 50, '--patience', 2, '--resume')) == 0
    assert run_script(SCRIPT, *args(root, '--max-epochs', 50, '--patience', 2)) == 0  # finished whatever the cap
    assert capsys.readouterr().out.count('already trained, nothing to do') == 2
    assert files_of(root) == before


def test_the_cap_ends_a_run_that_resume_can_extend_and_compat_gives_upstreams_lr_curve(template, tmp_path,
                                                                                     monkeypatch, capsys):
    root = new_root(template, tmp_path)
    scripted(monkeypatch, [1.0 / (e + 1) for e in range(12)])
    assert run_script(SCRIPT, *args(root, '--max-epochs', 3)) == 0
    assert 'property CNN: 3 epochs (reached --max-epochs); best epoch 2' in capsys.readouterr().out
    assert run_script(SCRIPT, *args(root, '--max-epochs', 2, '--resume')) == 2
    assert '--max-epochs is the total and cannot be below that' in capsys.readouterr().err
    assert run_script(SCRIPT, *args(root, '--max-epochs', 11, '--resume')) == 0
    log = pd.read_csv(run_files(root).train_log)
    assert log['epoch'].tolist() == list(range(11)) and log['best_epoch'].tolist() == list(range(11))
    assert log['lr'].tolist() == [cosine_lr(5e-05, e % 10) for e in range(11)] and log['lr'].min() > 0

    compat = new_root(template, tmp_path, 'compat')
    assert run_script(SCRIPT, *args(compat, '--max-epochs', 11, '--compat', 'upstream')) == 0
    lrs = pd.read_csv(run_files(compat).train_log)['lr'].tolist()
    assert lrs[:10] == log['lr'].tolist()[:10] and lrs[10] == 0.0  # CosineAnnealingLR(T_max=10) stepped past 10


def test_tf32_is_on_for_the_cnn_steps_and_off_for_the_scores(template, tmp_path, monkeypatch, capsys):
    root = new_root(template, tmp_path)
    scripted(monkeypatch, [1.0, 0.5])
    seen, step = [], _CnnTrainer.step

    def spy(self, images, labels):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return step(self, images, labels)

    monkeypatch.setattr(_CnnTrainer, 'step', spy)
    assert run_script(SCRIPT, *args(root, '--max-epochs', 1, '--tf32')) == 0
    assert seen == [(True, True)] * 2
    assert json.loads(run_files(root).options_json.read_text())['options']['tf32'] is True
    assert run_script(SCRIPT, *args(root, '--max-epochs', 2, '--resume')) == 0  # --tf32 may change
    assert seen[2:] == [(False, False)] * 2

    class Flags(torch.nn.Module):  # the scoring pass stays float32 even inside a --tf32 block
        def forward(self, images):
            flags = float(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
            return torch.full((len(images), 7), flags)

    dataset = ScoredImageDataset.filtered(Layout(root), Layout(root).property_scores_csv(2))
    with tf32(True):
        assert not score_dataset(Flags(), dataset, torch.device('cpu')).any()


def test_metrics_and_early_stopping_units():
    labels = np.array([[0.0] * 7, [1.0] * 7, [2.0] * 7])
    outputs = labels.copy()
    outputs[:, 0] = [0.0, 2.0, 4.0]     # eyes: r 1, errors 0, 1, 2
    outputs[:, 6] = [5.0, 5.0, 5.0]     # background_std: constant output, r 0 (not NaN)
    metrics = validation_metrics(outputs, labels)
    assert metrics.mse[0] == pytest.approx(5 / 3) and metrics.mae[0] == pytest.approx(1.0)
    assert metrics.r[0] == pytest.approx(1.0) and metrics.r[6] == 0.0 and metrics.r[3] == pytest.approx(1.0)
    assert metrics.mse[6] == pytest.approx((25 + 16 + 9) / 3)
    assert metrics.valid_loss == pytest.approx(metrics.mse.mean())
    assert metrics.valid_loss_no_back_std == pytest.approx(metrics.mse[:6].mean())

    stopping = EarlyStopping(patience=2)
    assert not stopping.should_stop(0)
    assert [stopping.update(e, v) for e, v in enumerate([3.0, 2.0, 2.0, 2.5])] == [True, True, False, False]
    assert stopping.best_epoch == 1 and not stopping.should_stop(2) and stopping.should_stop(3)
    assert EarlyStopping.from_state(2, stopping.state()) == stopping

    train, val = train_validation_split(4703, seed=0)
    assert (len(train), len(val)) == (4232, 471)  # upstream's sizes
    assert sorted(torch.cat([train, val]).tolist()) == list(range(4703))
    assert torch.equal(train_validation_split(4703, seed=0)[1], val)
    assert not torch.equal(train_validation_split(4703, seed=1)[1], val)


def test_amp_runs_the_cnn_in_bfloat16_on_cpu_with_a_float32_loss():
    trainer = _CnnTrainer(new_property_cnn(0), PropertyCnnSettings(amp=True), torch.device('cpu'))
    trainer.start_epoch()
    trainer.set_lr(0)
    dtypes = []
    trainer.model.eyes_score_cnn.fc_final.register_forward_hook(lambda module, i, out: dtypes.append(out.dtype))
    loss = trainer.step(torch.rand(2, 3, 256, 256) * 2 - 1, torch.randn(2, 7))
    assert dtypes == [torch.bfloat16] and np.isfinite(loss) and trainer.amp.enabled
    assert trainer.extra['train_images'] == 2


def test_a_nan_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(template, tmp_path, monkeypatch, capsys):
    root = new_root(template, tmp_path)
    calls = []
    real = torch.nn.functional.mse_loss

    class NanOnSecondCall:
        @staticmethod
        def mse_loss(a, b):
            calls.append(1)
            return real(a, b) * (float('nan') if len(calls) == 2 else 1.0)

    monkeypatch.setattr(property_cnn_training, 'F', NanOnSecondCall)
    assert run_script(SCRIPT, *args(root, '--max-epochs', 1, '--checkpoint-every', 1)) == 2
    assert capsys.readouterr().err.strip() == (
        'error: loss became nan at epoch 0, batch 1 (step 2); stopped before the optimiser step, the checkpoint of '
        'epoch 0, batch 1 (step 1) is kept')
    assert load_resume_record(run_files(root).resume_record).step == 1
    assert not published(root).exists()  # no epoch was validated: there is no best CNN yet


# --- the scoring pass on its own ---
@pytest.fixture(scope='module')
def cnn_file(fresh, tmp_path_factory):
    path = tmp_path_factory.mktemp('cnn') / 'given_cnn.pth'
    shutil.copy(published(fresh), path)
    return path


def test_property_cnn_only_writes_the_csvs(template, fresh, cnn_file, tmp_path, capsys):
    root = new_root(template, tmp_path)
    assert run_script(SCRIPT, *args(root, '--property-cnn', cnn_file)) == 0
    out = capsys.readouterr().out
    assert 'property CNN: ' in out and '(given; not trained)' in out
    assert not Layout(root).fine_tuned_dir.exists()  # no training, no run folder
    for mine, trained in zip(csvs(root), csvs(fresh)):
        assert mine.read_bytes() == trained.read_bytes()
    before = files_of(root)
    assert run_script(SCRIPT, *args(root, '--property-cnn', cnn_file)) == 0
    assert 'are up to date' in capsys.readouterr().out and files_of(root) == before
    Layout(root).filtered_image(IMG_NOS[0]).unlink()  # nothing to score: the images are not even read
    assert run_script(SCRIPT, *args(root, '--property-cnn', cnn_file)) == 0
    assert 'are up to date' in capsys.readouterr().out


def test_compat_scores_with_dropout_reproducibly_whatever_the_batch(template, fresh, cnn_file, tmp_path):
    roots = [new_root(template, tmp_path, name) for name in ('a', 'b')]
    for root, batch in zip(roots, (2, 1)):
        assert run_script(SCRIPT, *args(root, '--property-cnn', cnn_file, '--compat', 'upstream',
                                        '--eval-batch-size', batch)) == 0
    assert csvs(roots[0])[0].read_bytes() == csvs(roots[1])[0].read_bytes()
    assert csvs(roots[0])[0].read_bytes() != csvs(fresh)[0].read_bytes()  # dropout on
    record = json.loads(Layout(roots[0]).property_cnn_scoring_record.read_text())
    assert record['inputs']['mode'].startswith('train (dropout on')
    assert run_script(SCRIPT, *args(roots[0], '--property-cnn', cnn_file)) == 0  # back to eval: rewritten
    assert csvs(roots[0])[0].read_bytes() == csvs(fresh)[0].read_bytes()


def test_files_the_run_did_not_write_are_never_overwritten(template, cnn_file, reference_dir, tmp_path, capsys):
    root = new_root(template, tmp_path)
    atomic.write_bytes(published(root), b'a downloaded published property CNN')
    before = files_of(root)
    assert run_script(SCRIPT, *args(root, '--max-epochs', 1)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith(f'error: {published(root)} exists and was not written by this run')
    assert files_of(root) == before and not run_files(root).folder.exists()

    upstream_csv = reference_dir / 'ohlora' / 'data' / 'segmentation' / 'property_score_results' / \
        'all_scores_v2_cnn.csv'
    shutil.copy(upstream_csv, csvs(root)[0])  # upstream's published CNN labels, e.g. for a faithful v3 rerun
    before = files_of(root)
    assert run_script(SCRIPT, *args(root, '--property-cnn', cnn_file)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {csvs(root)[0]} exists and was not written by this run') and '--overwrite' in err
    assert files_of(root) == before
    assert run_script(SCRIPT, *args(root, '--property-cnn', cnn_file, '--overwrite')) == 0
    assert csvs(root)[0].read_bytes() != upstream_csv.read_bytes()


def test_a_scores_csv_another_cnn_made_is_not_replaced_without_overwrite(fresh, cnn_file, tmp_path, capsys):
    """The CSVs live in the root whatever --outdir says, so v2 runs with other --outdir (or another --property-cnn)
    share them: replacing the labels that a v3 run was trained on takes --overwrite, and the refusal names both
    CNNs. The same run's CNN still updates its own CSVs (the extension test)."""
    root = tmp_path / 'root'
    shutil.copytree(fresh, root)  # the CSVs of the CNN of the run stylegan_modified/fine_tuning_v2_cnn
    run_sha = hashlib.sha256(published(root).read_bytes()).hexdigest()
    other = tmp_path / 'other_cnn.pth'
    torch.save(new_property_cnn(5).state_dict(), other)
    other_sha = hashlib.sha256(other.read_bytes()).hexdigest()
    record = json.loads(Layout(root).property_cnn_scoring_record.read_text())
    assert record['inputs']['property_cnn_sha256'] == run_sha
    assert record['property_cnn'] == {'file': 'stylegan_modified/stylegan_gen_fine_tuned_v2_cnn.pth',
                                      'run': 'stylegan_modified/fine_tuning_v2_cnn'}
    scored_by = (f'the CNN of the v2 run stylegan_modified/fine_tuning_v2_cnn '
                 f'(stylegan_modified/stylegan_gen_fine_tuned_v2_cnn.pth), SHA-256 {run_sha[:16]}')

    # another run (its own --outdir) would train another CNN: refused before any training
    err = assert_refused(capsys, root, SCRIPT, *args(root, '--max-epochs', 1, '--outdir', root / 'runs' / 'b'),
                         match='all_scores_v2_cnn.csv holds the scores of another property CNN')
    assert scored_by in err and 'the CNN of the v2 run runs/b/fine_tuning_v2_cnn' in err and '--overwrite' in err
    # another given CNN
    err = assert_refused(capsys, root, SCRIPT, *args(root, '--property-cnn', other), match=scored_by)
    assert f'--property-cnn ../{other.name}, SHA-256 {other_sha[:16]}' in err  # recorded from the root
    # the same CNN as a given file is no other CNN: up to date
    assert run_script(SCRIPT, *args(root, '--property-cnn', cnn_file)) == 0
    assert 'are up to date' in capsys.readouterr().out
    # --overwrite: the user's choice; the record then names the new CNN
    assert run_script(SCRIPT, *args(root, '--property-cnn', other, '--overwrite')) == 0
    record = json.loads(Layout(root).property_cnn_scoring_record.read_text())
    assert record['inputs']['property_cnn_sha256'] == other_sha
    assert record['property_cnn'] == {'file': f'../{other.name}', 'run': None}
    assert csvs(root)[0].read_bytes() != csvs(fresh)[0].read_bytes()


def edit_scores(root, edit):
    path = Layout(root).property_scores_csv(2)
    atomic.write_csv(path, edit(pd.read_csv(path, index_col=0)), index=True)


@pytest.fixture(scope='module')
def wrong_files(reference_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp('wrong_files')
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    torch.save(tiny['state_dicts']['v1_generator'], folder / 'v1_generator.pth')
    torch.save(tiny['state_dicts']['v3_generator'], folder / 'v3_generator.pth')
    return folder


@pytest.mark.parametrize('case, message', [
    ('missing column', r'all_scores_v2.csv lacks the column\(s\) mouth_score'),
    ('nan', r'all_scores_v2.csv has empty or NaN values in column pose_score'),
    ('no image', r'000099.jpg does not exist'),
    ('one image', r'needs at least 2 scored images'),
    ('cnn is a generator', r'v1_generator.pth is an Oh-LoRA v1 \(or v2\) generator .*, not the Oh-LoRA v2 '
                           r'property-score CNN'),
    ('no cnn file', r'--property-cnn .*missing.pth: no such file'),
    ('v1 of another variant', r'v3_generator.pth is an Oh-LoRA v3 generator .*, not the Oh-LoRA v1 generator'),
    ('no v1 file', r'--v1-weights .*missing.pth: no such file'),
    ('no default v1 file', r'v1 generator is missing: .*stylegan_gen_fine_tuned_v1.pth does not exist .*switched off'),
    ('resume nothing', r'there is no run to resume'),
    ('resume scoring only', r'--resume continues a training run, but with --property-cnn'),
    ('not writable', r'cannot write into .*blocker/out: .*blocker is a file'),
])
def test_bad_input_is_one_line_before_anything_is_written(template, wrong_files, tmp_path, capsys, case, message):
    root = new_root(template, tmp_path)
    extra = ['--max-epochs', 1]
    if case == 'missing column':
        edit_scores(root, lambda f: f.drop(columns=['mouth_score']))
    elif case == 'nan':
        edit_scores(root, lambda f: f.assign(pose_score=[0.1, None, 0.3, 0.4]))
    elif case == 'no image':
        edit_scores(root, lambda f: f.assign(img_no=[4, 7, 11, 99]))
    elif case == 'one image':
        edit_scores(root, lambda f: f.iloc[:1])
    elif case == 'cnn is a generator':
        extra += ['--property-cnn', wrong_files / 'v1_generator.pth']
    elif case == 'no cnn file':
        extra += ['--property-cnn', tmp_path / 'missing.pth']
    elif case == 'v1 of another variant':
        extra += ['--train-generator', '--v1-weights', wrong_files / 'v3_generator.pth']
    elif case == 'no v1 file':
        extra += ['--train-generator', '--v1-weights', tmp_path / 'missing.pth']
    elif case == 'no default v1 file':
        extra += ['--train-generator']  # and downloads are off in the tests
    elif case == 'resume nothing':
        extra += ['--resume']
    elif case == 'resume scoring only':
        extra += ['--resume', '--property-cnn', wrong_files / 'v1_generator.pth']
    elif case == 'not writable':
        (root / 'blocker').write_text('a file where a folder should be')
        extra += ['--outdir', root / 'blocker' / 'out']
    before = files_of(root)
    assert run_script(SCRIPT, *args(root, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith('error: ')
    assert re.search(message, err), err
    assert files_of(root) == before


def test_help_has_examples_and_the_common_options(capsys):
    assert run_script(SCRIPT, '--help') == 0
    text = capsys.readouterr().out
    for option in ('--root', '--device', '--batch-size', '--seed', '--no-progress', '--compat', '--resume',
                   '--overwrite', '--amp', '--max-epochs', '--patience', '--eval-batch-size', '--scores',
                   '--property-cnn', '--train-generator', '--v1-weights', '--max-groups', '--gen-patience',
                   '--steps-per-group', '--gen-batch-size', '--checkpoint-every', '--outdir', '--workers'):
        assert option in text
    assert 'examples:' in text and '--resume --max-epochs 300' in text
