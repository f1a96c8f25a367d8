"""Stage-5 fine-tuning under torchrun: DDP, the split of each batch over the ranks, rank-0-only writing, every rank's
RNG streams in the resume record. Two gloo processes on this CPU (tests/distributed_helpers.run_ranks), tiny models.

One process session (two Python processes: starting them takes seconds) makes everything the tests below check:
two v3 steps, the v1 script's runs (fresh; stopped after an epoch and resumed; a refused batch size; a SIGTERM
that reaches rank 1 alone) and one v2 run (the CNN, its scores, the generator through it).
"""
import contextlib
import io
import json
import os
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch

from distributed_helpers import run_ranks
from ohlora.distributed import DistContext, context
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.resume import (capture_rng_state, load_resume_record, rank_seed, restore_rank_rng_state,
                           seed_everything)
from script_runner import files_of, run_script
from stylegan_modified.cvae_training import CVAETrainer, V3Settings
from stylegan_modified.datasets import check_batch_size, epoch_batches, rank_share
from stylegan_modified.ddp import rows
from stylegan_modified.fine_tuning import LOG_COLUMNS, V1Trainer
from stylegan_modified.v3_inputs import build_v3_models
from test_training_toolkit import upstream_scores_csv, write_images

V1_SCRIPT, V2_SCRIPT = 'run_stylegan_fine_tuning.py', 'run_stylegan_fine_tuning_v2.py'
IMG_NOS = [4, 7, 11, 20]
DETERMINISTIC_COLUMNS = [c for c in LOG_COLUMNS if c not in ('images_per_s', 'peak_gpu_mem_mb')]


# --- the batch split and the per-rank streams (no processes) ---
def test_each_batch_splits_into_disjoint_equal_shares_whose_union_is_the_batch():
    order = list(range(37))
    one = epoch_batches(order, 8, 1)
    assert [len(b) for b in one] == [8, 8, 8, 8, 5]  # one process: the last partial batch kept
    two = epoch_batches(order, 8, 1, world_size=2)
    assert two[:4] == one[:4] and two[4] == one[4][:4]  # trimmed to equal shares
    for batch in two:
        shares = [rank_share(batch, rank, 2) for rank in range(2)]
        assert len(shares[0]) == len(shares[1]) and sorted(shares[0] + shares[1]) == sorted(batch)
        assert shares[0][0] == batch[0]  # the batch's first image on rank 0
    assert [len(b) for b in epoch_batches(range(33), 16, 16, world_size=2)] == [16, 16]  # 1 left: no share each
    # D's minibatch-stddev rule per share: 40 left over on 2 ranks -> shares of 20 -> trimmed to 16 each
    assert [len(b) for b in epoch_batches(range(104), 64, 16, world_size=2)] == [64, 32]
    assert torch.equal(rows(torch.arange(6), DistContext(rank=1, world_size=2)), torch.tensor([1, 3, 5]))


@pytest.mark.parametrize('batch_size, group, message', [
    (15, 16, r'--batch-size 15 is the batch of one step over all 2 processes and must split evenly among them '
              r'\(e.g. 14 or 16\)'),
    (48, 16, r'--batch-size 48 gives each of the 2 processes 24 images, which cannot be split into the '
              r'discriminator\'s minibatch-stddev groups of 16; use a batch of 32 or a multiple of it'),
])
def test_a_batch_that_does_not_split_over_the_processes_is_one_line(batch_size, group, message):
    with pytest.raises(PipelineError, match=message):
        check_batch_size(batch_size, group, world_size=2)
    check_batch_size(32, 16, world_size=2)
    check_batch_size(48, 16)  # one process: the old rule


def test_rank_0_keeps_the_seed_and_a_record_of_other_ranks_restores_each_its_own():
    assert rank_seed(5, 0) == 5 and len({rank_seed(5, r) for r in range(4)}) == 4
    states = []
    for rank in range(2):
        seed_everything(rank_seed(3, rank))
        states.append(capture_rng_state())
    record_rng = {**states[0], 'ranks': states}
    for rank in range(2):
        restore_rank_rng_state(record_rng, DistContext(rank=rank, world_size=2), seed=3, step=7)
        assert torch.equal(torch.get_rng_state(), states[rank]['torch_cpu'])
    # another number of processes: the ranks the record knows restore theirs, a new one gets a fresh seed
    restore_rank_rng_state(record_rng, DistContext(rank=2, world_size=3), seed=3, step=7)
    fresh = torch.get_rng_state()
    assert not any(torch.equal(fresh, s['torch_cpu']) for s in states)
    restore_rank_rng_state(states[0], DistContext(), seed=3, step=7)  # a one-process record, as before
    assert torch.equal(torch.get_rng_state(), states[0]['torch_cpu'])


# --- v3: two DDP steps on two ranks equal one process on the whole batch ---
@pytest.fixture(scope='module')
def v3_inputs(reference_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp('ddp_v3_inputs')
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    torch.save(tiny['state_dicts']['v1_generator'], folder / 'v1.pth')
    generator = torch.Generator().manual_seed(5)
    batches = {'images': torch.rand(2, 4, 3, 256, 256, generator=generator) * 2 - 1,
               'labels': torch.randn(2, 4, 7, generator=generator),
               'eps': torch.randn(2, 4, 32, generator=generator)}
    torch.save(batches, folder / 'batches.pt')
    return folder


def tiny_scorers() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Stand-ins for the frozen property and gender CNNs (256x256 image -> 7 scores / P(woman)), seeded."""
    torch.manual_seed(11)
    features = [torch.nn.AvgPool2d(32), torch.nn.Flatten()]
    return (torch.nn.Sequential(*features, torch.nn.Linear(3 * 8 * 8, 7)),
            torch.nn.Sequential(*features, torch.nn.Linear(3 * 8 * 8, 1), torch.nn.Sigmoid()))


def v3_steps(folder, ctx):
    """Two v3 steps on this rank's rows of two batches of 4; the trained tensors and the losses afterwards."""
    generator, encoder = (model.double() for model in build_v3_models(folder / 'v1.pth', seed=0))
    property_cnn, gender_cnn = (model.double() for model in tiny_scorers())
    trainer = CVAETrainer(generator, encoder, property_cnn, gender_cnn, V3Settings(epochs=1, batch_size=4),
                          ctx.device, ctx)
    batches = {k: v.double() for k, v in torch.load(folder / 'batches.pt', weights_only=True).items()}
    losses = [trainer.step(*(rows(batches[k][s], ctx) for k in ('images', 'labels', 'eps'))).total_loss
              for s in range(2)]
    trained = {f'generator.{k}': v for k, v in generator.state_dict().items()
               if k.startswith('mapping.') or k == 'truncation.w_avg'}
    trained.update({f'encoder.{k}': v for k, v in encoder.state_dict().items()})
    return trained, losses


def test_two_ddp_steps_of_the_v3_encoder_and_mapping_equal_one_process_on_the_whole_batch(v3_inputs, sessions):
    ranks = [torch.load(v3_inputs / f'rank{r}.pt', weights_only=True) for r in range(2)]
    single, single_losses = v3_steps(v3_inputs, DistContext())
    before = {f'generator.{k}': v for k, v in build_v3_models(v3_inputs / 'v1.pth', seed=0)[0].state_dict().items()}
    for name, expected in single.items():
        assert torch.equal(ranks[0]['trained'][name], ranks[1]['trained'][name]), name  # DDP keeps ranks equal
        torch.testing.assert_close(ranks[0]['trained'][name], expected, rtol=1e-5, atol=1e-7, msg=name)
        if name in before:
            assert not torch.equal(before[name], expected), name  # it trained (w_avg: the whole batch's mean w)
    np.testing.assert_allclose(ranks[0]['losses'], single_losses, rtol=1e-5)
    assert ranks[0]['losses'] == ranks[1]['losses']  # the logged losses are the means over the ranks


# --- v1: the script under torchrun's environment ---
def v1_args(root, zoo, *extra):
    return ['--root', root, '--weights', zoo, '--batch-size', 4, '--workers', 0, '--snapshot-z', 1,
            '--snapshot-size', 32, '--device', 'cpu', '--no-progress', *extra]


def v2_args(root, inputs):
    """1 epoch of the CNN (3 training images: one step of 2, the odd one left out; 1 validation image, scored by
    rank 0 alone), then 1 step group of 2 steps of the generator through it."""
    return ['--root', root, '--batch-size', 2, '--eval-batch-size', 2, '--max-epochs', 1, '--train-generator',
            '--v1-weights', inputs / 'v1.pth', '--max-groups', 1, '--steps-per-group', 2, '--gen-batch-size', 2,
            '--workers', 0, '--device', 'cpu', '--no-progress']


def _rank_session(rank, v3_folder, folder, zoo):
    """What rank ``rank`` of two does: two v3 steps; then the v1 script's runs as torchrun would start them, every
    file and folder it creates noted."""
    trained, losses = v3_steps(v3_folder, context(torch.device('cpu')))
    torch.save({'trained': trained, 'losses': losses}, v3_folder / f'rank{rank}.pt')
    created = []
    real_replace, real_mkdir = os.replace, os.mkdir

    def replace(source, target, *args, **kwargs):
        created.append(str(target))
        return real_replace(source, target, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        created.append(str(path))
        return real_mkdir(path, *args, **kwargs)

    os.replace, os.mkdir = replace, mkdir
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            statuses = [run_script(V1_SCRIPT, *v1_args(folder / 'whole', zoo, '--epochs', 2, '--verbose')),
                        run_script(V1_SCRIPT, *v1_args(folder / 'split', zoo, '--epochs', 1)),
                        run_script(V1_SCRIPT, *v1_args(folder / 'split', zoo, '--epochs', 2, '--resume')),
                        run_script(V1_SCRIPT, *v1_args(folder / 'uneven', zoo, '--epochs', 1, '--batch-size', 5)),
                        run_script(V2_SCRIPT, *v2_args(folder / 'v2', v3_folder))]
        os.replace, os.mkdir = real_replace, real_mkdir
        original, steps = V1Trainer.step, []

        def step_then_signal(self, reals, labels):  # the signal reaches rank 1 alone, after the first step
            result = original(self, reals, labels)
            steps.append(1)
            if rank == 1 and len(steps) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        V1Trainer.step = step_then_signal
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            statuses.append(run_script(V1_SCRIPT, *v1_args(folder / 'signal', zoo, '--epochs', 2, '--batch-size', 2)))
    finally:
        os.replace, os.mkdir = real_replace, real_mkdir
    (folder / f'rank{rank}.json').write_text(json.dumps({'statuses': statuses, 'created': created,
                                                         'stdout': out.getvalue(), 'stderr': err.getvalue()}))


@pytest.fixture(scope='module')
def v1_template(tmp_path_factory):
    root = tmp_path_factory.mktemp('ddp_v1_template')
    layout = Layout(root)
    write_images(layout, IMG_NOS)
    upstream_scores_csv(layout.property_scores_csv(1), IMG_NOS)
    upstream_scores_csv(layout.property_scores_csv(2), IMG_NOS, seed=2)
    return root


@pytest.fixture(scope='module')
def sessions(v3_inputs, v1_template, genforce, tmp_path_factory):
    folder = tmp_path_factory.mktemp('ddp_v1')
    for name in ('whole', 'split', 'v2', 'signal'):
        shutil.copytree(v1_template, folder / name)
    run_ranks(_rank_session, v3_inputs, folder, genforce[0])
    return folder


@pytest.fixture(scope='module')
def v1_ranks(sessions):
    return sessions, [json.loads((sessions / f'rank{r}.json').read_text()) for r in range(2)]


@pytest.fixture(scope='module')
def v1_single(v1_template, genforce, tmp_path_factory):
    root = tmp_path_factory.mktemp('ddp_v1_single') / 'root'
    shutil.copytree(v1_template, root)
    assert run_script(V1_SCRIPT, *v1_args(root, genforce[0], '--epochs', 2)) == 0
    return root


def test_the_v1_script_picks_up_torchrun_and_only_rank_0_writes(v1_ranks, v1_single):
    folder, ranks = v1_ranks
    assert ranks[0]['statuses'][:5] == ranks[1]['statuses'][:5] == [0, 0, 0, 2, 0]
    assert ranks[1]['created'] == [] and ranks[1]['stdout'] == ''  # rank 1 writes and prints nothing
    assert any(p.endswith('resume_record.pt') for p in ranks[0]['created'])
    # the same files as one process writes, none more (no per-rank files, no temporaries left)
    assert files_of(folder / 'whole').keys() == files_of(v1_single).keys()
    assert 'fine-tuned v1 for 2 epochs (2 steps)' in ranks[0]['stdout']
    options = json.loads(Layout(folder / 'whole').training_run('v1').options_json.read_text())['options']
    assert options['world_size'] == 2 and options['batch_size'] == 4
    # the uneven batch is refused by both ranks before anything is written
    message = 'error: --batch-size 5 is the batch of one step over all 2 processes and must split evenly'
    assert all(message in rank['stderr'] for rank in ranks) and not (folder / 'uneven').exists()


def test_the_log_line_shows_world_size_2_on_rank_0_only(v1_ranks):
    _, ranks = v1_ranks
    assert 'v1 fine-tuning: world size 2 (gloo, cpu on rank 0), batch 4 images per step = 2 per process' in \
        ranks[0]['stderr']
    assert 'world size 2 (gloo' not in ranks[1]['stderr'] and 'warning' not in ranks[1]['stderr']


def test_the_record_holds_both_ranks_rng_and_a_resumed_2_rank_run_equals_the_uninterrupted_one(v1_ranks, v1_single):
    folder, _ = v1_ranks
    whole, split = (Layout(folder / name) for name in ('whole', 'split'))
    record = load_resume_record(whole.training_run('v1').resume_record)
    assert (record.epoch, record.batch, record.step) == (2, 0, 2)
    assert len(record.rng['ranks']) == 2
    assert not torch.equal(record.rng['ranks'][0]['torch_cpu'], record.rng['ranks'][1]['torch_cpu'])
    assert torch.equal(record.rng['torch_cpu'], record.rng['ranks'][0]['torch_cpu'])
    resumed = load_resume_record(split.training_run('v1').resume_record)
    for rank in range(2):
        assert torch.equal(resumed.rng['ranks'][rank]['torch_cpu'], record.rng['ranks'][rank]['torch_cpu'])
        assert torch.equal(resumed.rng['ranks'][rank]['numpy']['keys'], record.rng['ranks'][rank]['numpy']['keys'])
    for name in ('stylegan_gen_fine_tuned_v1.pth', 'stylegan_dis_fine_tuned_v1.pth'):
        a = torch.load(whole.fine_tuned_dir / name, weights_only=True)
        b = torch.load(split.fine_tuned_dir / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        one = torch.load(Layout(v1_single).fine_tuned_dir / name, weights_only=True)
        assert not all(torch.equal(a[k], one[k]) for k in a)  # 2 ranks are not 1 process (z, noise, groups)
    logs = [pd.read_csv(layout.training_run('v1').train_log)[DETERMINISTIC_COLUMNS] for layout in (whole, split)]
    pd.testing.assert_frame_equal(*logs)
    assert logs[0]['g_train_count'].between(1, 4).all()


def test_v2_trains_the_cnn_and_the_generator_on_2_ranks_and_rank_0_scores(v1_ranks):
    folder, ranks = v1_ranks
    layout = Layout(folder / 'v2')
    assert 'property CNN: 1 epochs (reached --max-epochs)' in ranks[0]['stdout']
    assert 'scores of 4 images: wrote' in ranks[0]['stdout'] and 'v2 generator: 1 step groups' in ranks[0]['stdout']
    assert layout.property_cnn_scores_csv.is_file() and layout.property_cnn_compare_csv.is_file()
    for version, steps in (('v2_cnn', 1), ('v2', 2)):
        files = layout.training_run(version)
        record = load_resume_record(files.resume_record)
        assert record.step == steps and len(record.rng['ranks']) == 2, version
        assert json.loads(files.options_json.read_text())['options']['world_size'] == 2
    # the one validation image (rank 0's share; rank 1 had none) is in the validation log
    assert len(pd.read_csv(layout.training_run('v2_cnn').validation_log)) == 1
    log = pd.read_csv(layout.training_run('v2').train_log)
    assert log['step'].tolist() == [0, 1] and np.isfinite(log['loss']).all()


def test_a_stop_signal_that_reaches_one_rank_stops_both_after_the_same_step(v1_ranks):
    folder, ranks = v1_ranks
    assert ranks[0]['statuses'][5] == ranks[1]['statuses'][5] == 130
    assert 'stopped by SIGTERM at epoch 0, batch 1 (step 1)' in ranks[0]['stderr']
    record = load_resume_record(Layout(folder / 'signal').training_run('v1').resume_record)
    assert (record.epoch, record.batch, record.step) == (0, 1, 1) and len(record.rng['ranks']) == 2


def test_resuming_a_2_rank_run_on_one_process_continues_and_says_it_is_not_exact(v1_ranks, genforce, tmp_path,
                                                                                 capsys):
    folder, _ = v1_ranks
    root = tmp_path / 'root'
    shutil.copytree(folder / 'whole', root)
    assert run_script(V1_SCRIPT, *v1_args(root, genforce[0], '--epochs', 3, '--resume')) == 0
    err = capsys.readouterr().err
    assert ('warning: resuming a run of 2 process(es) with 1: it continues from its checkpoint, but not '
            'bit-exactly') in err
    record = load_resume_record(Layout(root).training_run('v1').resume_record)
    assert (record.epoch, record.step) == (3, 3) and 'ranks' not in record.rng
    assert record.options['world_size'] == 1
