"""The stage-5 training toolkit on its own: resume record, option comparison, no-overwrite rule, scored-image
dataset, batch policy, train log, graceful stop, loss guard."""
import hashlib
import json
import os
import random
import signal

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from ohlora import atomic
from ohlora.constants import SCORE_COLUMNS
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.owned_files import OwnedFiles
from ohlora.resume import (ResumeRecord, capture_rng_state, check_resume_options, load_resume_record,
                           option_differences, restore_rng_state, save_resume_record, seed_everything)
from stylegan_modified.datasets import (ScoredImageDataset, check_batch_size, epoch_batches, epoch_order,
                                        minibatch_std_group_size)
from stylegan_modified.stylegan_discriminator import StyleGANDiscriminator
from stylegan_modified.training_control import GracefulStop, NonFiniteLoss, check_finite
from stylegan_modified.training_run import TrainLog


def draws():
    return torch.rand(3).tolist(), np.random.uniform(size=3).tolist(), np.random.normal(), random.random()


def test_rng_state_round_trip_covers_torch_numpy_and_python(tmp_path):
    seed_everything(7)
    np.random.normal()  # leaves a cached gaussian in NumPy's legacy state
    state = capture_rng_state()
    expected = draws()
    seed_everything(99)
    restore_rng_state(state)
    assert draws() == expected

    record = ResumeRecord(options={'epochs': 2, 'hyper': {'betas': [0.9, 0.999]}}, epoch=1, batch=3, step=9,
                          data_order=torch.tensor([2, 0, 1]), rng=state, models={'g': {'w': torch.ones(2)}},
                          optimizers={}, scalers={}, extra={'note': 'x'})
    save_resume_record(tmp_path / 'r.pt', record)
    torch.load(tmp_path / 'r.pt', map_location='cpu', weights_only=True)  # plain types and tensors only (R11)
    loaded = load_resume_record(tmp_path / 'r.pt')
    assert (loaded.epoch, loaded.batch, loaded.step, loaded.options, loaded.extra) == (1, 3, 9, record.options,
                                                                                       {'note': 'x'})
    assert torch.equal(loaded.data_order, record.data_order)
    restore_rng_state(loaded.rng)
    assert draws() == expected
    assert loaded.completes(1) is False and ResumeRecord({}, 2, 0, 9, None, state).completes(2)


def test_a_file_that_is_no_resume_record_is_one_line(tmp_path):
    torch.save({'mapping.dense0.weight': torch.zeros(2)}, tmp_path / 'x.pt')
    with pytest.raises(PipelineError, match='not a resume record'):
        load_resume_record(tmp_path / 'x.pt')
    (tmp_path / 'y.pt').write_bytes(b'garbage')
    with pytest.raises(PipelineError, match=r'y.pt (is not a readable|holds objects other)'):
        load_resume_record(tmp_path / 'y.pt')


def test_only_the_resumable_options_may_change():
    recorded = {'epochs': 1, 'device': 'cpu', 'workers': 2, 'no_progress': False, 'seed': 0,
                'hyper': {'lr': 1e-4}, 'data': {'fingerprint': 'a'}}
    allowed = {**recorded, 'epochs': 5, 'device': 'cuda:0', 'workers': 0, 'no_progress': True}
    assert option_differences(recorded, allowed) == []
    check_resume_options(recorded, allowed, 'run')
    changed = {**allowed, 'seed': 3, 'hyper': {'lr': 1e-3}, 'extra_option': True}
    assert option_differences(recorded, changed) == ['seed: 0 -> 3', 'hyper.lr: 0.0001 -> 0.001',
                                                     'extra_option: unset -> True']
    with pytest.raises(PipelineError, match=r"^run was started with other options \(seed: 0 -> 3; hyper.lr"):
        check_resume_options(recorded, changed, 'run')


def test_owned_files_refuse_foreign_files_and_survive_a_crash_between_steps(tmp_path):
    manifest, out = tmp_path / 'run' / 'written.json', tmp_path / 'model.pth'
    owned = OwnedFiles(manifest, base=tmp_path)
    owned.check([out])  # absent: fine
    assert owned.write_bytes(out, b'first') and out.read_bytes() == b'first'
    assert not owned.write_bytes(out, b'first')  # same bytes: nothing written
    assert owned.write_bytes(out, b'second')
    assert json.loads(manifest.read_text()) == {'model.pth': [hashlib.sha256(b'second').hexdigest()]}
    assert str(tmp_path) not in manifest.read_text()  # relative paths only (R4)

    foreign = tmp_path / 'published.pth'
    foreign.write_bytes(b'downloaded')
    with pytest.raises(PipelineError, match=r'published.pth exists and was not written by this run.*--overwrite'):
        owned.check([out, foreign])
    with pytest.raises(PipelineError, match='never overwritten'):
        owned.write_bytes(foreign, b'mine')
    assert foreign.read_bytes() == b'downloaded'
    out.write_bytes(b'edited by hand')  # the run's own file, changed by someone else: foreign now
    with pytest.raises(PipelineError):
        OwnedFiles(manifest, base=tmp_path).check([out])

    # A crash after the file was replaced but before the manifest was finalised: both hashes are accepted.
    crash = OwnedFiles(tmp_path / 'run2' / 'written.json', base=tmp_path)
    target = tmp_path / 'g.pth'
    crash.write_bytes(target, b'old')
    original = atomic.write_bytes
    calls = []

    def fail_after_file(path, data):
        original(path, data)
        calls.append(path)
        if path == target:
            raise KeyboardInterrupt

    atomic.write_bytes = fail_after_file
    try:
        with pytest.raises(KeyboardInterrupt):
            crash.write_bytes(target, b'new')
    finally:
        atomic.write_bytes = original
    assert target.read_bytes() == b'new' and crash.owns(target)
    OwnedFiles(tmp_path / 'run3.json', base=tmp_path).check([tmp_path / 'g.pth'], overwrite=True)  # --overwrite


def write_images(layout, img_nos, seed=0):
    rng = np.random.default_rng(seed)
    for no in img_nos:
        small = rng.uniform(0, 255, (8, 8, 3))
        atomic.write_image(layout.filtered_image(no), np.clip(cv2.resize(small, (256, 256)), 0, 255).astype(np.uint8))


def upstream_scores_csv(path, img_nos, seed=0):
    """all_scores.csv as upstream wrote it: unnamed index column, absolute Windows img_path, 4 decimals."""
    scores = np.random.default_rng(seed).normal(size=(len(img_nos), 7)).round(4)
    frame = pd.DataFrame(scores, columns=SCORE_COLUMNS)
    frame.insert(0, 'img_path', [f'C:\\Users\\x\\AI_Projects\\{n:06d}.jpg' for n in img_nos])
    frame.insert(0, 'img_no', img_nos)
    atomic.write_csv(path, frame, index=True)
    return scores


def test_scored_image_dataset_reads_upstream_csvs_by_img_no(tmp_path):
    layout = Layout(tmp_path)
    write_images(layout, [4, 9, 12])
    scores = upstream_scores_csv(tmp_path / 'all_scores.csv', [4, 9, 12])
    dataset = ScoredImageDataset.filtered(layout, tmp_path / 'all_scores.csv')
    dataset.verify()
    assert dataset.img_nos == [4, 9, 12] and len(dataset) == 3
    assert dataset.labels.dtype == np.float32 and dataset.labels.shape == (3, 7)
    np.testing.assert_array_equal(dataset.labels, scores.astype(np.float32))
    item = dataset[1]
    assert item['label'].dtype == torch.float32 and item['index'] == 1
    pixels = torch.from_numpy(cv2.imread(str(layout.filtered_image(9)))[:, :, ::-1].copy()).permute(2, 0, 1)
    assert torch.equal(item['image'], (pixels.float() / 255 - 0.5) / 0.5)  # ToTensor, Normalize(0.5, 0.5)
    assert item['image'].min() >= -1 and item['image'].max() <= 1
    assert len(dataset.fingerprint()) == 16


@pytest.mark.parametrize('edit, message', [
    (lambda f: f.drop(columns=['pose_score']), 'lacks the column.*pose_score'),
    (lambda f: f.assign(mouth_score=[0.1, np.nan]), 'empty or NaN values in column mouth_score'),
    (lambda f: f.assign(eyes_score=['0.1', 'wide']), 'non-numeric values'),
    (lambda f: f.assign(img_no=[4, 4]), 'lists img_no 4 more than once'),
    (lambda f: f.assign(img_no=['4', 'x']), "img_no that is not a whole number"),
])
def test_scored_image_dataset_rejects_bad_csvs_in_one_line(tmp_path, edit, message):
    layout = Layout(tmp_path)
    write_images(layout, [4, 9])
    frame = pd.DataFrame(np.zeros((2, 7)), columns=SCORE_COLUMNS)
    frame.insert(0, 'img_no', [4, 9])
    atomic.write_csv(tmp_path / 's.csv', edit(frame))
    with pytest.raises(PipelineError, match=message):
        ScoredImageDataset.filtered(layout, tmp_path / 's.csv')


def test_verify_names_the_missing_or_undecodable_image(tmp_path):
    layout = Layout(tmp_path)
    write_images(layout, [1, 2])
    frame = pd.DataFrame(np.zeros((3, 7)), columns=SCORE_COLUMNS)
    frame.insert(0, 'img_no', [1, 2, 3])
    atomic.write_csv(tmp_path / 's.csv', frame)
    with pytest.raises(PipelineError, match=r'000003.jpg does not exist'):
        ScoredImageDataset.filtered(layout, tmp_path / 's.csv').verify()
    write_images(layout, [3])
    layout.filtered_image(2).write_bytes(b'not a jpeg')
    with pytest.raises(PipelineError, match=r'000002.jpg \(img_no 2 of s.csv\) cannot be decoded'):
        ScoredImageDataset.filtered(layout, tmp_path / 's.csv').verify()
    atomic.write_image(layout.filtered_image(2), np.zeros((128, 128, 3), np.uint8))
    with pytest.raises(PipelineError, match='000002.jpg is 128x128; training needs 256x256'):
        ScoredImageDataset.filtered(layout, tmp_path / 's.csv').verify()


def test_batch_policy_follows_the_minibatch_std_group():
    tiny_d = StyleGANDiscriminator(resolution=256, fmaps_base=1024, fmaps_max=16)
    assert minibatch_std_group_size(tiny_d) == 16
    for ok in (1, 2, 15, 16, 32, 48):
        check_batch_size(ok, 16)
    with pytest.raises(PipelineError, match='--batch-size 20 cannot be split.*e.g. 16 or 32'):
        check_batch_size(20, 16)
    # upstream: 4,703 images at 16 -> 294 batches, the last of 15 (kept: a group of 15 divides it)
    batches = epoch_batches(range(4703), 16, 16)
    assert len(batches) == 294 and len(batches[-1]) == 15
    # 50 at 32: the last 18 cannot form groups of 16, so 2 are left out this epoch
    assert [len(b) for b in epoch_batches(range(50), 32, 16)] == [32, 16]
    assert [len(b) for b in epoch_batches(range(40), 32, 16)] == [32, 8]
    # every batch really runs through the tiny D
    with torch.no_grad():
        for size in (8, 15):
            assert tiny_d(torch.zeros(size, 3, 256, 256), torch.zeros(size, 7)).shape == (size, 1)
        with pytest.raises(ValueError, match='not a multiple'):
            tiny_d(torch.zeros(18, 3, 256, 256), torch.zeros(18, 7))
    # the order depends only on (seed, epoch)
    assert torch.equal(epoch_order(3, 1, 10), epoch_order(3, 1, 10))
    assert not torch.equal(epoch_order(3, 1, 10), epoch_order(3, 2, 10))
    assert sorted(epoch_order(0, 0, 10).tolist()) == list(range(10))


def test_train_log_keeps_the_rows_of_the_resume_point(tmp_path):
    log = TrainLog(tmp_path / 'log.csv', ['epoch', 'loss', 'auroc'], flush_every=100)
    for k in range(5):
        log.append({'epoch': k, 'loss': 0.1 * k, 'auroc': None if k == 2 else float('nan') if k == 3 else 0.5})
    log.flush()
    text = (tmp_path / 'log.csv').read_text()
    assert text.splitlines()[:4] == ['epoch,loss,auroc', '0,0.0,0.5', '1,0.1,0.5', '2,0.2,']
    frame = pd.read_csv(tmp_path / 'log.csv')
    assert list(frame.columns) == ['epoch', 'loss', 'auroc'] and frame['auroc'].isna().sum() == 2
    again = TrainLog(tmp_path / 'log.csv', ['epoch', 'loss', 'auroc'])
    again.load(keep=3)
    again.flush()
    assert (tmp_path / 'log.csv').read_text() == ''.join(text.splitlines(keepends=True)[:4])
    with pytest.raises(PipelineError, match='does not have the columns'):
        TrainLog(tmp_path / 'log.csv', ['epoch', 'other']).load(keep=1)
    with pytest.raises(ValueError, match='not columns'):
        again.append({'typo': 1})


def test_train_log_appends_its_rows_instead_of_rewriting_the_file(tmp_path, monkeypatch):
    """Rewriting the whole CSV at every flush costs ~3 GB of writes over a v3 run: rows are appended (the file
    keeps its inode, nothing is rewritten); on resume the file is cut back once to the record's rows, a torn last
    line included."""
    path = tmp_path / 'log.csv'
    log = TrainLog(path, ['step', 'loss'], flush_every=10)
    log.reset()
    inode = path.stat().st_ino
    rewrites = []
    write_bytes = atomic.write_bytes
    monkeypatch.setattr(atomic, 'write_bytes', lambda p, data: (rewrites.append(p), write_bytes(p, data))[1])
    for k in range(25):
        log.append({'step': k, 'loss': k / 4})
        assert path.read_text().count('\n') == 1 + 10 * ((k + 1) // 10)  # flushed every 10 rows
    log.flush()
    assert rewrites == [] and path.stat().st_ino == inode
    rows = [f'{k},{k / 4!r}\n' for k in range(25)]
    assert path.read_text() == 'step,loss\n' + ''.join(rows)

    atomic.append_text(path, '25,6.2')  # an append interrupted by a crash after the record of step 20
    again = TrainLog(path, ['step', 'loss'], flush_every=10)
    again.load(keep=20)
    assert path.read_text() == 'step,loss\n' + ''.join(rows[:20]) and rewrites == [path]
    again.append({'step': 20, 'loss': 5.0})
    again.flush()
    assert path.read_text() == 'step,loss\n' + ''.join(rows[:21]) and len(rewrites) == 1
    again.load(keep=21)  # nothing to cut: not rewritten
    assert len(rewrites) == 1


def test_graceful_stop_turns_the_first_signal_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == 'SIGTERM'
        with pytest.raises(KeyboardInterrupt):  # a second signal: at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_non_finite_loss_is_one_line():
    check_finite('epoch 0', 'kept', d_loss=torch.tensor(1.0), g_loss=2.0)
    with pytest.raises(NonFiniteLoss, match=r'^g_loss became inf at epoch 0, batch 3; stopped .*kept$'):
        check_finite('epoch 0, batch 3', 'the last checkpoint is kept', d_loss=1.0, g_loss=torch.tensor(np.inf))


def test_float32_overflow_and_folders_under_published_names_are_refused_up_front(tmp_path):
    """A label of 1e39 is finite in float64 but inf for the models; a folder where a checkpoint goes would only
    fail at the first save (after an epoch), even with --overwrite: both are refused before any work."""
    import pandas as pd

    from ohlora.errors import PipelineError
    from ohlora.owned_files import OwnedFiles
    from ohlora.tables import float32_matrix

    frame = pd.DataFrame({'a': [1.0, 1e39]})
    with pytest.raises(PipelineError, match='beyond the float32 range'):
        float32_matrix(frame, ['a'], tmp_path / 'x.csv', 'scores')
    assert float32_matrix(pd.DataFrame({'a': [1.0, 3e38]}), ['a'], tmp_path / 'x.csv', 'scores').dtype.name == 'float32'

    (tmp_path / 'ckpt.pth').mkdir()
    owned = OwnedFiles(tmp_path / 'written.json', tmp_path, 'use --outdir')
    for overwrite in (False, True):
        with pytest.raises(PipelineError, match='ckpt.pth: it is a folder'):
            owned.check([tmp_path / 'ckpt.pth'], overwrite=overwrite)
    assert not (tmp_path / 'written.json').exists()
