"""Stage 5 v1 (run_stylegan_fine_tuning.py) on the tiny GenForce zoo file and a few drawn 256x256 images.

Four images at batch 2 make 2 steps per epoch; the expensive runs (a fresh 2-epoch run, the same run split by
--resume, and one split by SIGTERM in the middle of an epoch) are made once per module and shared.
"""
import json
import os
import re
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch

from ohlora import atomic
from ohlora.layout import Layout
from ohlora.resume import load_resume_record
from rerun_helpers import kill_a_worker_after_the_stop, sigterm_group_when
from script_runner import files_of, run_script
from stylegan.stylegan_discriminator import StyleGANDiscriminator as GenForceD
from stylegan.stylegan_generator import StyleGANGenerator as GenForceG
from stylegan_modified import fine_tuning
from stylegan_modified.checkpoint import load_conditional_discriminator, load_conditional_generator
from stylegan_modified.datasets import epoch_order
from stylegan_modified.fine_tuning import (LOG_COLUMNS, FineTuningSettings, V1Trainer, alternate_g_steps,
                                           build_models, discriminator_trainable_layers, real_fake_auroc)
from stylegan_modified.monitoring import MonitoringGrid
from test_training_toolkit import upstream_scores_csv, write_images

SCRIPT = 'run_stylegan_fine_tuning.py'
IMG_NOS = [4, 7, 11, 20]
G_FILE, D_FILE = 'stylegan_gen_fine_tuned_v1.pth', 'stylegan_dis_fine_tuned_v1.pth'
DETERMINISTIC_COLUMNS = [c for c in LOG_COLUMNS if c not in ('images_per_s', 'peak_gpu_mem_mb')]


@pytest.fixture(scope='module')
def zoo(genforce):
    return genforce[0]


@pytest.fixture(scope='module')
def template(tmp_path_factory):
    """A root with the stage-2 filtered images and the stage-4 all_scores.csv (upstream form)."""
    root = tmp_path_factory.mktemp('stage5_template')
    layout = Layout(root)
    write_images(layout, IMG_NOS)
    upstream_scores_csv(layout.property_scores_csv(1), IMG_NOS)
    return root


def new_root(template, tmp_path, name='root'):
    root = tmp_path / name
    shutil.copytree(template, root)
    return root


def args(root, zoo, *extra):
    return ['--root', root, '--weights', zoo, '--batch-size', 2, '--workers', 0, '--snapshot-z', 1,
            '--snapshot-size', 32, '--device', 'cpu', '--no-progress', *extra]


def outputs(root):
    folder = Layout(root).fine_tuned_dir
    return folder / G_FILE, folder / D_FILE


def run_files(root):
    return Layout(root).training_run('v1')


def log_frame(root):
    return pd.read_csv(run_files(root).train_log)


def state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_run(root_a, root_b):
    for a, b in zip(outputs(root_a), outputs(root_b)):
        sa, sb = state(a), state(b)
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), a.name
    pd.testing.assert_frame_equal(log_frame(root_a)[DETERMINISTIC_COLUMNS], log_frame(root_b)[DETERMINISTIC_COLUMNS])
    ra = load_resume_record(run_files(root_a).resume_record)
    rb = load_resume_record(run_files(root_b).resume_record)
    assert (ra.epoch, ra.batch, ra.step) == (rb.epoch, rb.batch, rb.step)
    for name in ra.optimizers:
        for index, values in ra.optimizers[name]['state'].items():
            for key, tensor in values.items():
                assert torch.equal(tensor, rb.optimizers[name]['state'][index][key]), (name, index, key)
    assert torch.equal(ra.rng['torch_cpu'], rb.rng['torch_cpu'])
    assert torch.equal(ra.rng['numpy']['keys'], rb.rng['numpy']['keys'])


@pytest.fixture(scope='module')
def fresh(template, zoo, tmp_path_factory):
    """--epochs 2 in one go."""
    root = new_root(template, tmp_path_factory.mktemp('fresh'))
    assert run_script(SCRIPT, *args(root, zoo, '--epochs', 2)) == 0
    return root


def test_fresh_run_writes_the_published_files_log_options_and_snapshots(fresh, zoo):
    g_path, d_path = outputs(fresh)
    generator = load_conditional_generator(g_path, 'v1')  # plain state_dicts under the published names
    discriminator = load_conditional_discriminator(d_path, 'v1')
    assert generator.label_size == 7 and generator.label_convert_dim == 16 and discriminator.label_size == 7
    assert list(state(g_path))[0] == 'mapping.label_weight'  # upstream key order

    log = log_frame(fresh)
    assert list(log.columns) == list(LOG_COLUMNS)  # no unnamed index column
    assert log[['epoch', 'idx']].values.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert np.isfinite(log[['d_loss', 'g_loss', 'real_scores_mean', 'fake_scores_mean']].to_numpy()).all()
    assert log['real_fake_auroc'].between(0, 1).all() and (log['images_per_s'] > 0).all()
    assert log['peak_gpu_mem_mb'].isna().all()  # CPU
    # the alternation rule: fewer than 4 G steps only when the last g_loss fell below 2 * d_loss
    assert log['g_train_count'].between(1, 4).all()
    stopped_early = log['g_train_count'] < 4
    assert (log.loc[stopped_early, 'g_loss'] < 2 * log.loc[stopped_early, 'd_loss']).all()

    files = run_files(fresh)
    options = json.loads(files.options_json.read_text())
    assert options['options']['epochs'] == 2 and options['options']['seed'] == 0
    assert options['options']['hyper'] == {'lr': 1e-4, 'betas': [0.9, 0.999], 'weight_decay': 0.01, 'r1_gamma': 10.0,
                                           'max_g_steps': 4, 'g_loss_ratio': 2.0, 'w_moving_decay': 0.995}
    assert options['provenance']['zoo_file'] == 'tiny_ckpt.pth'
    assert str(fresh) not in files.options_json.read_text()  # no absolute path (R4)
    assert sorted(p.name for p in files.snapshots_dir.iterdir()) == ['epoch_0000_idx_0000.png',
                                                                     'epoch_0001_idx_0000.png']
    record = load_resume_record(files.resume_record)
    assert (record.epoch, record.batch, record.step) == (2, 0, 4)


def test_frozen_parts_stay_and_trainable_parts_move(fresh, zoo):
    initial_g, initial_d = build_models(zoo, 'upstream', seed=0)
    zoo_g = torch.load(zoo, map_location='cpu', weights_only=True)['generator']
    trained_g, trained_d = state(outputs(fresh)[0]), state(outputs(fresh)[1])
    for name, before in initial_g.state_dict().items():
        moved = not torch.equal(before, trained_g[name])
        if name.startswith('mapping.'):
            assert moved and (before != trained_g[name]).float().mean() > 0.9, name  # every mapping parameter
        elif name == 'truncation.w_avg':
            assert moved  # the moving average of the train-mode G calls, as upstream
        else:
            assert not moved and torch.equal(trained_g[name], zoo_g[name]), name
    trainable = discriminator_trainable_layers(initial_d)
    assert trainable == ('layer12', 'layer13', 'layer14')
    for name, before in initial_d.state_dict().items():
        moved = not torch.equal(before, trained_d[name])
        assert moved == (name.split('.')[0] in trainable and not name.endswith('kernel')), name


def test_init_is_seeded_as_upstream_and_warm_keeps_the_pretrained_mapping(zoo):
    cpu_state = torch.get_rng_state()
    g0, d0 = build_models(zoo, 'upstream', seed=0)
    assert torch.equal(torch.get_rng_state(), cpu_state)  # the init draws from its own generator
    g0b, _ = build_models(zoo, 'upstream', seed=0)
    g1, d1 = build_models(zoo, 'upstream', seed=1)
    assert torch.equal(g0.mapping.dense0.weight, g0b.mapping.dense0.weight)
    for a, b in ((g0.mapping.dense0.weight, g1.mapping.dense0.weight), (g0.mapping.label_weight,
                 g1.mapping.label_weight), (d0.layer14.weight, d1.layer14.weight)):
        assert not torch.equal(a, b)
    assert torch.count_nonzero(d0.layer14.bias) == 0
    assert g0.mapping.dense0.weight.shape == (64, 80) and d0.layer14.weight.shape == (1, 16 + 7)

    warm, _ = build_models(zoo, 'warm', seed=0)
    pretrained = GenForceG(**{k: v for k, v in json.loads(
        (zoo.parent / 'tiny_config.json').read_text())['generator_kwargs'].items()})
    pretrained.load_state_dict(torch.load(zoo, map_location='cpu', weights_only=True)['generator'])
    z = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = pretrained.mapping(z)['w']
        zero_label = warm.mapping(z, torch.zeros(5, 7))['w']  # embedding 0: the fan-in change cancels exactly
        real_label = warm.mapping(z, torch.randn(5, 7, generator=torch.Generator().manual_seed(4)))['w']
        upstream = g0.mapping(z, torch.zeros(5, 7))['w']
    assert torch.allclose(zero_label, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(real_label, expected, atol=1e-3)  # only approximately preserved for real labels
    assert (upstream - expected).abs().mean() > 2 * (real_label - expected).abs().mean()


def test_alternation_rule_and_auroc():
    losses = iter([5.0, 4.5, 1.0, 9.0])
    assert alternate_g_steps(lambda: next(losses), d_loss=1.0) == (3, 1.0)  # 5, 4.5 >= 2; 1.0 < 2: stop
    assert alternate_g_steps(lambda: 9.0, d_loss=1.0) == (4, 9.0)           # at most 4
    assert alternate_g_steps(lambda: 0.1, d_loss=1.0) == (1, 0.1)
    assert real_fake_auroc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.875
    assert real_fake_auroc(torch.tensor([]), torch.tensor([1.0])) is None
    assert real_fake_auroc(torch.tensor([np.nan]), torch.tensor([1.0])) is None


def test_a_step_with_g_loss_kept_high_trains_g_four_times(zoo, monkeypatch):
    generator, discriminator = build_models(zoo)
    trainer = V1Trainer(generator, discriminator, FineTuningSettings(epochs=1, batch_size=2), torch.device('cpu'))
    original = fine_tuning.g_nonsaturating_loss
    monkeypatch.setattr(fine_tuning, 'g_nonsaturating_loss', lambda logits: original(logits) + 100.0)
    reals = torch.rand(2, 3, 256, 256) * 2 - 1
    result = trainer.step(reals, torch.zeros(2, 7))
    assert result.g_train_count == 4 and result.g_loss >= 2 * result.d_loss
    assert int(trainer.g_optimizer.state_dict()['state'][0]['step']) == 4
    assert int(trainer.d_optimizer.state_dict()['state'][0]['step']) == 1


def test_amp_step_keeps_r1_in_float32(zoo, monkeypatch):
    generator, discriminator = build_models(zoo)
    trainer = V1Trainer(generator, discriminator, FineTuningSettings(epochs=1, batch_size=2, amp=True),
                        torch.device('cpu'))
    seen = []
    original = fine_tuning.r1_penalty
    monkeypatch.setattr(fine_tuning, 'r1_penalty', lambda logits, reals, gamma: seen.append(
        (logits.dtype, reals.dtype)) or original(logits, reals, gamma))
    result = trainer.step(torch.rand(2, 3, 256, 256) * 2 - 1, torch.zeros(2, 7))
    assert seen == [(torch.float32, torch.float32)]
    assert np.isfinite([result.d_loss, result.g_loss]).all()
    assert trainer.amp.dtype == torch.bfloat16 and trainer.amp.enabled


def test_snapshots_draw_nothing_from_the_training_rngs(zoo):
    generator, _ = build_models(zoo)
    grid = MonitoringGrid(generator.z_space_dim, seed=0, num_z=2, cell_size=32)
    states = torch.get_rng_state(), np.random.get_state()[1].copy()
    w_avg = generator.truncation.w_avg.clone()
    first = grid.render(generator, 'title')
    assert generator.training  # mode restored
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(generator.truncation.w_avg, w_avg)
    assert np.array_equal(first, grid.render(generator, 'title'))  # eval mode, stored noise: same image
    assert first.shape[0] > 2 * 32 and first.shape[1] > 7 * 32


def test_resume_after_one_epoch_equals_the_uninterrupted_run(template, zoo, fresh, tmp_path):
    root = new_root(template, tmp_path)
    assert run_script(SCRIPT, *args(root, zoo, '--epochs', 1)) == 0
    assert load_resume_record(run_files(root).resume_record).epoch == 1
    assert run_script(SCRIPT, *args(root, zoo, '--epochs', 2, '--resume')) == 0
    assert_same_run(fresh, root)


def test_sigterm_mid_epoch_leaves_a_resumable_checkpoint(template, zoo, fresh, tmp_path, monkeypatch, capsys):
    root = new_root(template, tmp_path)
    original, steps = V1Trainer.step, []

    def step_then_signal(self, reals, labels):
        result = original(self, reals, labels)
        steps.append(1)
        if len(steps) == 3:  # the first batch of epoch 1: the stop comes inside an epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(V1Trainer, 'step', step_then_signal)
    run_args = args(root, zoo, '--epochs', 2, '--checkpoint-every', 0)  # only the signal makes a mid-epoch one
    assert run_script(SCRIPT, *run_args) == 130
    assert 'stopped by SIGTERM at epoch 1, batch 1 (step 3)' in capsys.readouterr().err
    record = load_resume_record(run_files(root).resume_record)
    assert (record.epoch, record.batch, record.step) == (1, 1, 3) and record.data_order is not None
    assert len(log_frame(root)) == 3
    monkeypatch.setattr(V1Trainer, 'step', original)
    assert run_script(SCRIPT, *run_args) == 2  # no --resume: refused
    assert 'unfinished run (1 epochs and 1 batches of 2); pass --resume' in capsys.readouterr().err
    assert run_script(SCRIPT, *run_args, '--resume', '--checkpoint-every', 1) == 2
    assert '(checkpoint_every: 0 -> 1); only --epochs, --device, --workers, --no-progress' in capsys.readouterr().err
    assert run_script(SCRIPT, *run_args, '--resume', '--workers', 1) == 0  # --workers may change
    assert_same_run(fresh, root)


def test_a_sigterm_to_the_process_group_stops_cleanly_and_resumes_exactly(template, zoo, fresh, tmp_path):
    """Slurm, `timeout` and `kill -- -PGID` signal every process of the group, DataLoader workers included: the run
    still stops after its step with a complete checkpoint (status 130, one line), leaves no process behind, and
    --resume finishes it exactly (before the fix: "DataLoader worker ... is killed by signal: Terminated")."""
    root = new_root(template, tmp_path)
    run_args = args(root, zoo, '--epochs', 2, '--workers', 2, '--checkpoint-every', 1)
    status, err, left = sigterm_group_when(SCRIPT, run_args, run_files(root).resume_record.exists)  # after step 1
    assert status == 130, err
    assert re.fullmatch(r'stopped by SIGTERM at epoch \d, batch \d \(step [1-3]\); the checkpoint is complete '
                        r'\(.*\); continue with --resume\n', err), err
    assert left == []  # the workers ended with the main process
    record = load_resume_record(run_files(root).resume_record)
    assert 1 <= record.step < 4 and len(log_frame(root)) == record.step
    assert run_script(SCRIPT, *run_args, '--resume') == 0
    assert_same_run(fresh, root)


@pytest.mark.parametrize('batch, position', [(0, (1, 0, 2)), (1, (1, 1, 3))])
def test_a_worker_killed_by_the_stop_signal_is_the_stop(template, zoo, fresh, tmp_path, monkeypatch, capsys,
                                                       batch, position):
    """A worker the group's SIGTERM kills before it could ignore it (it was starting): batch 0 of epoch 1, the
    main process waits for that batch and stops there; batch 1, the worker dies during the step of batch 0,
    which ends normally. Both stop with a checkpoint of the steps done; --resume equals the uninterrupted run."""
    root = new_root(template, tmp_path)
    fatal = int(epoch_order(0, 1, len(IMG_NOS))[2 * batch])  # the first image of that batch of epoch 1
    kill_a_worker_after_the_stop(monkeypatch, V1Trainer, '(step 2)', fatal, tmp_path / 'armed')
    run_args = args(root, zoo, '--epochs', 2, '--workers', 2)
    assert run_script(SCRIPT, *run_args) == 130
    err = capsys.readouterr().err
    assert err.startswith('stopped by SIGTERM at epoch {}, batch {} (step {}); the checkpoint is complete'
                          .format(*position)) and err.count('\n') == 1, err
    record = load_resume_record(run_files(root).resume_record)
    assert (record.epoch, record.batch, record.step) == position
    monkeypatch.undo()
    assert run_script(SCRIPT, *run_args, '--resume') == 0
    assert_same_run(fresh, root)


def tf32_flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_tf32_is_an_option_of_the_run_on_for_its_steps_and_may_change_on_resume(template, zoo, fresh, tmp_path,
                                                                              monkeypatch):
    root = new_root(template, tmp_path)
    seen, step = [], V1Trainer.step

    def spy(self, reals, labels):
        seen.append(tf32_flags())
        return step(self, reals, labels)

    monkeypatch.setattr(V1Trainer, 'step', spy)
    assert run_script(SCRIPT, *args(root, zoo, '--epochs', 1, '--tf32')) == 0
    assert seen == [(True, True)] * 2 and tf32_flags() == (False, False)  # off again after the run
    assert json.loads(run_files(root).options_json.read_text())['options']['tf32'] is True
    assert load_resume_record(run_files(root).resume_record).options['tf32'] is True
    seen.clear()
    assert run_script(SCRIPT, *args(root, zoo, '--epochs', 2, '--resume')) == 0  # without --tf32: allowed
    assert seen == [(False, False)] * 2
    assert_same_run(fresh, root)  # TF32 changes nothing on a CPU


def test_a_plain_rerun_of_a_finished_run_writes_nothing(fresh, zoo, capsys):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in fresh.rglob('*') if p.is_file()}
    assert run_script(SCRIPT, *args(fresh, zoo, '--epochs', 2)) == 0
    assert 'already holds a finished run of 2 epochs; nothing to do' in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in fresh.rglob('*') if p.is_file()} == before


@pytest.mark.parametrize('extra, message', [
    (['--epochs', 2, '--seed', 1], r'holds another run \(seed: 0 -> 1\); rerun with its options'),
    (['--epochs', 2, '--init', 'warm', '--resume'], r"was started with other options \(init: 'upstream' -> 'warm'\)"),
    (['--epochs', 3], r'holds a finished run of 2 epochs; pass --resume --epochs 3 to extend it'),
    (['--epochs', 1, '--resume'], r'already done 2 epochs; --epochs is the total and cannot be below that'),
])
def test_a_run_over_another_run_is_refused(fresh, zoo, capsys, extra, message):
    before = files_of(fresh)
    assert run_script(SCRIPT, *args(fresh, zoo, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and re.search(message, err), err
    assert files_of(fresh) == before


def test_the_saved_generator_loads_in_stage_6(fresh, tmp_path):
    z = np.random.default_rng(1).standard_normal(64)
    pd.DataFrame([z], columns=[str(k) for k in range(64)]).to_csv(tmp_path / 'z.csv', index=False)
    assert run_script('run_fine_tuned_generator.py', '--model', 'v1', '--weights', outputs(fresh)[0], '--z-csv',
                      tmp_path / 'z.csv', '--root', tmp_path / 'out', '--num', 2, '--device', 'cpu',
                      '--no-progress') == 0
    assert sorted(p.name for p in Layout(tmp_path / 'out').final_inference_dir('v1').glob('*.jpg')) == [
        '000000.jpg', '000001.jpg']


def test_a_published_file_the_run_did_not_write_is_never_overwritten(template, zoo, fresh, tmp_path, capsys):
    root = new_root(template, tmp_path)
    g_path, d_path = outputs(root)
    atomic.write_bytes(d_path, b'a downloaded published v1 discriminator')
    before = files_of(root)
    assert run_script(SCRIPT, *args(root, zoo, '--epochs', 1)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith(f'error: {d_path} exists and was not written by this run')
    assert '--root or --outdir' in err and '--overwrite' in err
    assert files_of(root) == before and not run_files(root).folder.exists()

    # a file replaced after the run wrote it is refused too, on resume
    shutil.copytree(fresh / 'stylegan_modified', root / 'stylegan_modified', dirs_exist_ok=True)
    atomic.write_bytes(g_path, b'someone else\'s generator')
    before = files_of(root)
    assert run_script(SCRIPT, *args(root, zoo, '--epochs', 3, '--resume')) == 2
    assert f'{g_path} exists and was not written by this run' in capsys.readouterr().err
    assert files_of(root) == before


def test_a_nan_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(template, zoo, tmp_path, monkeypatch,
                                                                         capsys):
    root = new_root(template, tmp_path)
    original, calls = fine_tuning.d_logistic_loss, []

    def nan_on_second_step(real, fake):
        calls.append(1)
        return original(real, fake) * (float('nan') if len(calls) == 2 else 1.0)

    monkeypatch.setattr(fine_tuning, 'd_logistic_loss', nan_on_second_step)
    assert run_script(SCRIPT, *args(root, zoo, '--epochs', 1, '--checkpoint-every', 1)) == 2
    err = capsys.readouterr().err.strip()
    assert err == ('error: d_loss became nan at epoch 0, batch 1 (step 2); stopped before the optimiser step, the '
                   'checkpoint of epoch 0, batch 1 (step 1) is kept')
    record = load_resume_record(run_files(root).resume_record)
    assert record.step == 1
    g_state = state(outputs(root)[0])
    assert all(torch.equal(g_state[k], v) for k, v in record.models['generator'].items())


def zoo_file(path, resolution):
    torch.manual_seed(0)
    kwargs = dict(fmaps_base=1024, fmaps_max=16)
    generator = GenForceG(resolution, z_space_dim=16, w_space_dim=16, mapping_fmaps=16, **kwargs)
    discriminator = GenForceD(resolution, **kwargs)
    torch.save({'generator': generator.state_dict(), 'discriminator': discriminator.state_dict(),
                'generator_smooth': generator.state_dict()}, path)
    return path


@pytest.fixture(scope='module')
def bad_inputs(reference_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp('bad_inputs')
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    torch.save(tiny['state_dicts']['v1_generator'], folder / 'v1_generator.pth')
    return {'zoo128': zoo_file(folder / 'zoo128.pth', 128), 'v1_generator': folder / 'v1_generator.pth'}


def edit_scores(root, edit):
    path = Layout(root).property_scores_csv(1)
    atomic.write_csv(path, edit(pd.read_csv(path, index_col=0)), index=True)


@pytest.mark.parametrize('case, message', [
    ('missing column', r'all_scores.csv lacks the column\(s\) mouth_score'),
    ('nan', r'all_scores.csv has empty or NaN values in column pose_score'),
    ('non-numeric', r'all_scores.csv has non-numeric values'),
    ('no image', r'000099.jpg does not exist'),
    ('undecodable', r'000007.jpg \(img_no 7 of all_scores.csv\) cannot be decoded'),
    ('other resolution', r'zoo128.pth: its generator is for 128x128 images'),
    ('other model', r'v1_generator.pth is an Oh-LoRA v1 \(or v2\) generator'),
    ('not writable', r'cannot write into .*blocker/out: .*blocker is a file'),
    ('batch size', r'--batch-size 24 cannot be split'),
    ('mixing', r'--style-mixing-prob must be in \[0, 1\]'),
    ('resume nothing', r'there is no run to resume'),
    ('no weights', r'--weights .*missing.pth: no such file'),
])
def test_bad_input_is_one_line_before_anything_is_written(template, zoo, bad_inputs, tmp_path, capsys, case,
                                                          message):
    root = new_root(template, tmp_path)
    weights, extra = zoo, []
    if case == 'missing column':
        edit_scores(root, lambda f: f.drop(columns=['mouth_score']))
    elif case == 'nan':
        edit_scores(root, lambda f: f.assign(pose_score=[0.1, None, 0.3, 0.4]))
    elif case == 'non-numeric':
        edit_scores(root, lambda f: f.assign(eyes_score=['0.1', 'open', '0.3', '0.4']))
    elif case == 'no image':
        edit_scores(root, lambda f: f.assign(img_no=[4, 7, 11, 99]))
    elif case == 'undecodable':
        Layout(root).filtered_image(7).write_bytes(b'\xff\xd8 truncated')
    elif case == 'other resolution':
        weights = bad_inputs['zoo128']
    elif case == 'other model':
        weights = bad_inputs['v1_generator']
    elif case == 'not writable':
        (root / 'blocker').write_text('a file where a folder should be')
        extra = ['--outdir', root / 'blocker' / 'out']
    elif case == 'batch size':
        extra = ['--batch-size', 24]
    elif case == 'mixing':
        extra = ['--style-mixing-prob', 1.5]
    elif case == 'resume nothing':
        extra = ['--resume']
    elif case == 'no weights':
        weights = tmp_path / 'missing.pth'
    before = files_of(root)
    assert run_script(SCRIPT, *args(root, weights, '--epochs', 1, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith('error: ')
    assert re.search(message, err), err
    assert files_of(root) == before
    assert not run_files(root).folder.exists()


def test_help_has_examples_and_the_common_options(capsys):
    assert run_script(SCRIPT, '--help') == 0
    text = capsys.readouterr().out
    for option in ('--root', '--device', '--batch-size', '--seed', '--no-progress', '--compat', '--resume',
                   '--overwrite', '--amp', '--init', '--style-mixing-prob', '--checkpoint-every', '--snapshot-every'):
        assert option in text
    assert 'examples:' in text and '--epochs 50 --resume' in text
