"""Stage 2 end to end: run_cnn.py scores, merges and filters drawn images with full-size CNNs of known behaviour.

The test weights make each net compute sigmoid(12 * tanh(v) + b) of one colour channel v in [0, 1] of a
flat image (red for gender, green for quality), with a different bias b per fold: the scores, their ensemble
means and the filter's choice are then known in advance.
"""
import math

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cnn.models import MODEL_CLASSES
from cnn import filtering
from cnn.scoring import score_images
from ohlora import atomic
from ohlora.layout import Layout
from script_runner import run_script

SCRIPT = 'run_cnn.py'
CHANNEL = {'gender': 0, 'quality': 1}  # RGB index each property reads
GAIN = 12.0
FOLD_BIAS = [-5.4, -5.2, -5.0, -4.8, -4.6]
# (red, green) of each drawn image; images 0 and 1 get labels from a CSV.
COLOURS = [(40, 230), (230, 230), (230, 230), (230, 40), (40, 230), (230, 200)]
LABELS_CSV = 'img_name,quality,gender\n0,1,1\n1,0,1\n'


def channel_net(prop, bias):
    """A state_dict passing one input channel unchanged through every conv and pool into fc1 unit 0."""
    state = {k: torch.zeros_like(v) for k, v in MODEL_CLASSES[prop]().state_dict().items()}
    state['conv1.0.weight'][0, CHANNEL[prop], 1, 1] = 1.0
    for key in state:
        if key.endswith('.0.weight') and key.startswith('conv') and key != 'conv1.0.weight':
            state[key][0, 0, 1, 1] = 1.0
    state['fc1.0.weight'][0, 0] = 1.0
    state['fc_final.0.weight'][0, 0] = GAIN
    state['fc_final.0.bias'][0] = bias
    return state


def expected_score(value_uint8, bias):
    return 1.0 / (1.0 + math.exp(-(GAIN * math.tanh(value_uint8 / 255.0) + bias)))


@pytest.fixture(scope='module')
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('weights')
    for prop in CHANNEL:
        for fold, bias in enumerate(FOLD_BIAS):
            atomic.torch_save(folder / f'{prop}_model_{fold}.pt', channel_net(prop, bias))
    return folder


def draw_root(root, colours=COLOURS, labels=True):
    layout = Layout(root)
    for img_no, (red, green) in enumerate(colours):
        rgb = np.zeros((256, 256, 3), np.uint8)
        rgb[..., 0], rgb[..., 1], rgb[..., 2] = red, green, 90
        atomic.write_image(layout.synthesized_image(img_no), rgb[:, :, ::-1])
    atomic.write_json(layout.synthesized_meta, {'source': 'sampled', 'recipe': {'seed': 0}})
    if labels:
        (root / 'labels.csv').write_text(LABELS_CSV)
    return layout


def cli(root, weights_dir, *extra):
    args = ['--root', root, '--device', 'cpu', '--workers', 0, '--no-progress', '--batch-size', 3]
    args += [] if weights_dir is None else ['--weights', weights_dir]
    labels = root / 'labels.csv'
    return run_script(SCRIPT, *args, *(['--labels', labels] if labels.exists() else []), *extra)


def decoded(layout, img_no):
    return cv2.imread(str(layout.synthesized_image(img_no)))[..., ::-1]  # RGB


def test_scores_merge_and_filter(tmp_path, weights_dir, capsys):
    layout = draw_root(tmp_path)
    assert cli(tmp_path, weights_dir) == 0
    for prop in CHANNEL:
        frame = pd.read_csv(layout.cnn_inference_csv(prop))
        assert list(frame.columns) == ['img_no', 'img_path', f'property_{prop}_final_score'] + [
            f'score_model_{k}' for k in range(5)]
        assert frame['img_no'].tolist() == [2, 3, 4, 5]  # labelled images are not scored
        assert frame['img_path'][0] == 'stylegan/synthesize_results/000002.jpg'
        for _, row in frame.iterrows():
            value = float(decoded(layout, int(row['img_no']))[..., CHANNEL[prop]].mean())
            per_model = [expected_score(value, b) for b in FOLD_BIAS]
            assert [row[f'score_model_{k}'] for k in range(5)] == pytest.approx(per_model, abs=2e-4)
            assert row[f'property_{prop}_final_score'] == pytest.approx(np.mean(per_model), abs=2e-4)

    merged = pd.read_csv(layout.cnn_merged_csv)
    assert list(merged.columns) == ['img_no', 'img_path', 'gender_score', 'quality_score']
    assert merged['img_no'].tolist() == [0, 1, 2, 3, 4, 5]
    assert merged.iloc[:2][['gender_score', 'quality_score']].to_numpy().tolist() == [[1.0, 1.0], [1.0, 0.0]]
    kept = sorted(p.name for p in layout.filtered_dir.iterdir())
    assert kept == ['000000.jpg', '000002.jpg', '000005.jpg']
    for name in kept:
        original, copy = layout.synthesized_dir / name, layout.filtered_dir / name
        assert copy.read_bytes() == original.read_bytes() and copy.samefile(original)  # hard link
    assert 'kept 3 images' in capsys.readouterr().out

    # A rerun changes nothing and scores nothing.
    outputs = [layout.cnn_inference_csv('gender'), layout.cnn_inference_csv('quality'), layout.cnn_merged_csv]
    stamps = [p.stat().st_mtime_ns for p in outputs]
    assert cli(tmp_path, weights_dir) == 0
    assert [p.stat().st_mtime_ns for p in outputs] == stamps
    assert '3 already there' in capsys.readouterr().out

    # A stricter quality threshold drops image 5 (quality about 0.946), and says so.
    assert cli(tmp_path, weights_dir, '--quality-threshold', 0.95) == 0
    assert sorted(p.name for p in layout.filtered_dir.iterdir()) == ['000000.jpg', '000002.jpg']
    assert 'removed 1 filtered images of an earlier run' in capsys.readouterr().out and \
        (layout.synthesized_dir / '000005.jpg').exists()


def test_compat_scores_with_dropout_seeded(tmp_path, weights_dir):
    roots = [tmp_path / 'a', tmp_path / 'b']
    for root in roots:
        draw_root(root, COLOURS[1:3], labels=False)
        assert cli(root, weights_dir, '--compat', 'upstream', '--seed', 3) == 0
    first, second = (pd.read_csv(Layout(r).cnn_inference_csv('gender')) for r in roots)
    pd.testing.assert_frame_equal(first, second)  # same seed, same dropout draws
    layout = Layout(roots[0])
    eval_scores = [expected_score(float(decoded(layout, n)[..., 0].mean()), FOLD_BIAS[0]) for n in range(2)]
    assert np.abs(first['score_model_0'].to_numpy() - eval_scores).max() > 1e-3  # dropout changed something


class ChannelMean(nn.Module):
    """Mean of one RGB channel as the score; raises after ``fail_after`` forward passes (a crash mid-run)."""

    def __init__(self, channel, fail_after=None):
        super().__init__()
        self.channel, self.fail_after, self.calls = channel, fail_after, 0

    def forward(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError('simulated crash')
        self.calls += 1
        return x[:, self.channel].mean(dim=(1, 2)).reshape(-1, 1)


def test_interrupted_scoring_never_leaves_partial_rows_under_the_final_names(tmp_path):
    layout = draw_root(tmp_path, labels=False)
    finals = [layout.cnn_inference_csv(p) for p in CHANNEL]
    cpu = torch.device('cpu')

    def score(settings, fail_after=None):
        ensembles = {prop: [ChannelMean(c, fail_after)] * 5 for prop, c in CHANNEL.items()}  # 5 score columns
        result = score_images(layout, ensembles, list(range(6)), settings, device=cpu, batch_size=2,
                              checkpoint_every=2, progress=False)
        return result, ensembles

    score({'models': 'A'})
    complete = {p: p.read_bytes() for p in finals}
    assert pd.read_csv(finals[0])['img_no'].tolist() == list(range(6))

    # Other models, crashing in the third batch: progress is kept aside, the finished CSVs of A stay as they were.
    with pytest.raises(RuntimeError, match='simulated crash'):
        score({'models': 'B'}, fail_after=10)
    assert {p: p.read_bytes() for p in finals} == complete
    partial = pd.read_csv(layout.cnn_partial_scores('gender'))
    assert partial['img_no'].tolist() == [0, 1, 2, 3]
    assert not any(p.name.startswith('.tmp-') for p in finals[0].parent.iterdir())

    # The rerun scores only the last two images, then replaces the final CSVs and drops the partial rows.
    result, ensembles = score({'models': 'B'})
    assert result.scored_now == 2 and ensembles['gender'][0].calls == 5  # one batch, five models
    frame = pd.read_csv(layout.cnn_inference_csv('gender'))
    assert frame['img_no'].tolist() == list(range(6))
    red = [float(decoded(layout, n)[..., 0].mean()) / 255 for n in range(6)]
    assert frame['property_gender_final_score'].tolist() == pytest.approx(red, abs=1e-4)
    assert not layout.cnn_partial_scores('gender').exists() and not layout.cnn_partial_scores('quality').exists()

    # Finished: a rerun scores nothing and writes nothing; fewer images to score shrink the final CSVs.
    stamps = [p.stat().st_mtime_ns for p in (*finals, layout.cnn_record('scoring'))]
    result, ensembles = score({'models': 'B'})
    assert result.scored_now == 0 and ensembles['gender'][0].calls == 0
    assert [p.stat().st_mtime_ns for p in (*finals, layout.cnn_record('scoring'))] == stamps
    ensembles = {prop: [ChannelMean(c)] * 5 for prop, c in CHANNEL.items()}
    score_images(layout, ensembles, [1, 4], {'models': 'B'}, device=cpu, progress=False)
    assert pd.read_csv(finals[1])['img_no'].tolist() == [1, 4] and ensembles['gender'][0].calls == 0

    # A final CSV edited by hand is not trusted: its images are scored again.
    finals[0].write_text(finals[0].read_text().replace('\n4,', '\n5,'))
    result = score_images(layout, ensembles, [1, 4], {'models': 'B'}, device=cpu, progress=False)
    assert result.scored_now == 2 and pd.read_csv(finals[0])['img_no'].tolist() == [1, 4]


def test_filter_copies_where_links_fail_and_removes_stale_files(tmp_path, monkeypatch):
    layout = draw_root(tmp_path, labels=False)
    layout.filtered_dir.mkdir(parents=True)
    (layout.filtered_dir / '.tmp-99-000001.jpg').write_bytes(b'left by a killed run')
    (layout.filtered_dir / '000004.jpg').write_bytes(b'an older image 4')

    def no_links(source, dest):
        raise OSError('cross-device link')

    monkeypatch.setattr(filtering.os, 'link', no_links)
    result = filtering.sync_filtered(layout, [0, 2, 4], progress=False)
    assert (result.kept, result.linked, result.copied, result.unchanged, result.removed) == (3, 0, 3, 0, [])
    for name in ('000000.jpg', '000002.jpg', '000004.jpg'):
        copy = layout.filtered_dir / name
        assert copy.read_bytes() == (layout.synthesized_dir / name).read_bytes()
        assert not copy.samefile(layout.synthesized_dir / name)
    assert sorted(p.name for p in layout.filtered_dir.iterdir()) == ['000000.jpg', '000002.jpg', '000004.jpg']

    monkeypatch.undo()
    result = filtering.sync_filtered(layout, [2, 3], progress=False)
    assert (result.linked, result.unchanged, result.removed) == (1, 1, [0, 4])  # an equal copy is left alone
    assert sorted(p.name for p in layout.filtered_dir.iterdir()) == ['000002.jpg', '000003.jpg']
    assert (layout.filtered_dir / '000003.jpg').samefile(layout.synthesized_image(3))


class BlindNet(nn.Module):
    """Cannot see the image, so no fold can reach its validation bound."""

    def __init__(self):
        super().__init__()
        self.fc_final = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())

    def forward(self, x):
        return self.fc_final(x.new_zeros(len(x), 1))


def test_failed_retrain_fails_in_one_line_and_keeps_the_installed_models(tmp_path, weights_dir, monkeypatch, capsys):
    layout = draw_root(tmp_path, COLOURS * 2, labels=False)
    (tmp_path / 'labels.csv').write_text('img_name,quality,gender\n' + ''.join(
        f'{n},{n % 2},{(n // 2) % 2}\n' for n in range(12)))
    layout.cnn_models_dir.mkdir(parents=True)
    for path in weights_dir.iterdir():
        (layout.cnn_models_dir / path.name).write_bytes(path.read_bytes())
    before = {p.name: p.read_bytes() for p in layout.cnn_models_dir.iterdir()}
    for prop in CHANNEL:
        monkeypatch.setitem(MODEL_CLASSES, prop, BlindNet)
    assert cli(tmp_path, None, '--retrain', '--max-epochs', 1, '--max-attempts', 1) == 2
    err = capsys.readouterr().err
    assert 'quality fold 0 failed all 1 attempts' in err and err.count('\n') == 1, err
    assert {p.name: p.read_bytes() for p in layout.cnn_models_dir.iterdir()} == before
    assert not layout.cnn_inference_csv('quality').exists() and not layout.cnn_merged_csv.exists()


def test_unreadable_image_is_skipped_and_reported(tmp_path, weights_dir, capsys):
    layout = draw_root(tmp_path, COLOURS[2:5], labels=False)
    layout.synthesized_image(1).write_bytes(b'\xff\xd8 truncated jpeg')
    assert cli(tmp_path, weights_dir) == 0
    out, err = capsys.readouterr()
    # warnings go to stderr (ohlora.logs), the summary to stdout
    assert 'warning: image 000001 skipped: unreadable image 000001.jpg' in err and '1 unreadable images skipped' in out
    assert pd.read_csv(layout.cnn_merged_csv)['img_no'].tolist() == [0, 2]
    assert sorted(p.name for p in layout.filtered_dir.iterdir()) == ['000000.jpg']


def test_bad_input_fails_in_one_line_and_destroys_nothing(tmp_path, weights_dir, capsys):
    empty = tmp_path / 'empty'
    assert cli(empty, weights_dir) == 2
    assert 'holds no images' in capsys.readouterr().err

    layout = draw_root(tmp_path / 'root', COLOURS[:2], labels=False)
    root = layout.root
    atomic.write_csv(layout.cnn_merged_csv, pd.DataFrame({'img_no': [0]}))
    layout.filtered_dir.mkdir(parents=True)
    (layout.filtered_dir / '000001.jpg').write_bytes(b'from an earlier run')
    before = {p: p.read_bytes() for p in (layout.cnn_merged_csv, layout.filtered_dir / '000001.jpg')}

    bad_weights = tmp_path / 'bad_weights'
    bad_weights.mkdir()
    for path in weights_dir.iterdir():
        (bad_weights / path.name).write_bytes(path.read_bytes())
    (bad_weights / 'gender_model_3.pt').write_bytes((weights_dir / 'quality_model_3.pt').read_bytes())
    corrupt_weights = tmp_path / 'corrupt_weights'
    corrupt_weights.mkdir()
    for path in weights_dir.iterdir():
        (corrupt_weights / path.name).write_bytes(path.read_bytes()[:-300] if path.name == 'quality_model_1.pt'
                                                  else path.read_bytes())
    cases = [
        ('img_name,gender\n0,1\n', [], 'lacks the column(s) quality'),
        ('img_name,quality,gender\n0,1,3\n', [], 'must hold 0 or 1, found 3'),
        ('img_name,quality,gender\n0,1,1\n7,1,1\n', [], 'first: 000007.jpg'),
        ('img_name,quality,gender\n0,1,1\n', [bad_weights], 'gender_model_3.pt does not fit the gender CNN'),
        ('img_name,quality,gender\n0,1,1\n', [corrupt_weights], 'quality_model_1.pt is not a readable PyTorch'),
        ('img_name,quality,gender\n0,1,\n', [], 'empty or NaN values in column gender'),
        ('img_name,quality,gender\n0,1,1\n', [tmp_path / 'nowhere'],
         f'--weights {tmp_path / "nowhere"}: no such folder'),
        (None, [None, '--retrain'], '--retrain needs labels'),
        ('img_name,quality,gender\n0,1,1\n', ['--retrain'], '--weights and --retrain exclude each other'),
    ]
    for labels, extra, message in cases:
        labels_csv = root / 'labels.csv'
        if labels is None:
            labels_csv.unlink(missing_ok=True)
        else:
            labels_csv.write_text(labels)
        weights, extra = (extra[0], extra[1:]) if extra and not str(extra[0]).startswith('--') else (weights_dir, extra)
        assert cli(root, weights, *extra) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count('\n') == 1, err
    assert {p: p.read_bytes() for p in before} == before
    assert not layout.cnn_inference_csv('gender').exists()

    (root / 'labels.csv').unlink()
    (layout.filtered_dir / 'keep.txt').write_text('mine')
    assert cli(root, weights_dir) == 2  # checked before anything is scored
    assert 'not stage-1 images (keep.txt)' in capsys.readouterr().err
    assert not layout.cnn_inference_csv('gender').exists() and not layout.cnn_record('scoring').exists()
    (layout.synthesized_dir / 'notes.txt').write_text('mine')
    assert cli(root, weights_dir) == 2
    assert 'not stage-1 images (notes.txt)' in capsys.readouterr().err
