"""The common plumbing: layout, downloads (offline), atomic writes, checkpoint and CSV readers, CLI help."""
import numpy as np
import pandas as pd
import pytest
import torch

from ohlora import atomic
from ohlora.checkpoints import load_strict, read_checkpoint
from ohlora.errors import PipelineError, WeightsUnavailable
from ohlora.layout import CODE_ROOT, Layout, parse_img_no
from ohlora.tables import float32_matrix, read_table
from ohlora.weights import SOURCES, fetch
from script_runner import SCRIPTS, script_main

REPO = CODE_ROOT


def test_layout_keeps_upstream_names_under_root(tmp_path):
    layout = Layout(tmp_path)
    assert layout.synthesized_image(7) == tmp_path / 'stylegan' / 'synthesize_results' / '000007.jpg'
    assert layout.cnn_model('gender', 3) == tmp_path / 'cnn' / 'models' / 'gender_model_3.pt'
    assert layout.parsing_map(12).name == 'parsing_000012.png'
    assert layout.property_scores_csv(2).name == 'all_scores_v2.csv'
    assert layout.relative(layout.filtered_image(4)) == 'stylegan/synthesize_results_filtered/000004.jpg'
    assert parse_img_no('parsing_visualization_000123.png') == 123
    assert parse_img_no('notes.txt') is None


def test_shipped_data_resolves_beside_code_unless_root_has_it(tmp_path):
    layout = Layout(tmp_path)
    assert layout.hand_labels_csv == REPO / 'cnn' / 'synthesize_results_quality_and_gender.csv'
    assert layout.hand_labels_csv.is_file() and layout.test_z_csv.is_file()
    own = tmp_path / 'cnn' / 'synthesize_results_quality_and_gender.csv'
    own.parent.mkdir(parents=True)
    own.write_text('img_name,quality,gender\n0,1,1\n')
    assert layout.hand_labels_csv == own


def test_fetch_offline_names_file_source_and_override(tmp_path):
    with pytest.raises(WeightsUnavailable) as info:
        fetch('v3_generator', Layout(tmp_path))
    message = str(info.value)
    assert '\n' not in message
    assert 'stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth' in message
    assert 'daebakgazua/250408_OhLoRA_StyleGAN_FineTuned' in message and '--weights' in message
    with pytest.raises(WeightsUnavailable, match='genforce/genforce#44'):
        fetch('genforce_stylegan256', Layout(tmp_path))


def test_fetch_prefers_override_then_cache(tmp_path):
    layout = Layout(tmp_path)
    with pytest.raises(PipelineError, match='no such file'):
        fetch('facexformer', layout, tmp_path / 'nope.pt')
    cached = SOURCES['facexformer'].destination(layout)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b'x')
    assert fetch('facexformer', layout) == cached
    other = tmp_path / 'mine.pt'
    other.write_bytes(b'y')
    assert fetch('facexformer', layout, other) == other


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / 'a' / 'table.csv'
    atomic.write_csv(target, pd.DataFrame({'img_no': [1, 2]}))
    assert target.read_text() == 'img_no\n1\n2\n'
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text('half')
            raise RuntimeError('crash')
    assert target.read_text() == 'img_no\n1\n2\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ['table.csv']


def test_atomic_image_is_opencv_default_jpeg(tmp_path):
    import cv2

    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    atomic.write_image(tmp_path / 'x.jpg', rgb)
    ok, expected = cv2.imencode('.jpg', rgb)
    assert (tmp_path / 'x.jpg').read_bytes() == expected.tobytes()


class _NotATensor:
    pass


def test_read_checkpoint_errors_are_one_line(tmp_path):
    good = tmp_path / 'good.pt'
    torch.save({'a': torch.zeros(2)}, good)
    assert read_checkpoint(good, 'thing')['a'].shape == (2,)
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(good.read_bytes()[:40])
    for path, pattern in [(tmp_path / 'missing.pt', 'no such file'), (truncated, 'not a readable'),
                          (tmp_path / 'text.pt', 'not a readable')]:
        if path.name == 'text.pt':
            path.write_text('hello')
        with pytest.raises(PipelineError, match=pattern) as info:
            read_checkpoint(path, 'thing')
        assert '\n' not in str(info.value)
    pickled = tmp_path / 'pickled.pt'
    torch.save({'a': _NotATensor()}, pickled)
    with pytest.raises(PipelineError, match='other than tensors'):
        read_checkpoint(pickled, 'thing')


def test_load_strict_reports_missing_unexpected_and_shapes():
    module = torch.nn.Linear(3, 2)
    with pytest.raises(PipelineError) as info:
        load_strict(module, {'weight': torch.zeros(2, 4), 'extra': torch.zeros(1)}, 'f.pt', 'linear')
    message = str(info.value)
    assert '1 missing keys (bias)' in message and '1 unexpected keys (extra)' in message
    assert 'weight [2, 4] vs [2, 3]' in message


def test_read_table_validates(tmp_path):
    path = tmp_path / 't.csv'
    path.write_text(',img_no,img_path,eyes_score\n0,4,C:\\x\\000004.jpg,0.5\n1,5,y,\n')
    with pytest.raises(PipelineError, match='NaN values in column eyes_score'):
        read_table(path, ['img_no', 'eyes_score'], 'scores')
    with pytest.raises(PipelineError, match='lacks the column.*mouth_score'):
        read_table(path, ['img_no', 'mouth_score'], 'scores')
    frame = read_table(path, ['img_no'], 'scores')
    assert list(frame.columns) == ['img_no', 'img_path', 'eyes_score']
    values = float32_matrix(frame.iloc[:1], ['eyes_score'], path, 'scores')
    assert values.dtype == np.float32 and values[0, 0] == 0.5


NO_NETWORK_SCRIPTS = {'merge_shards.py'}


@pytest.mark.parametrize('script', sorted(p.name for p in SCRIPTS.glob('*.py')))
def test_scripts_have_help_with_examples(script, capsys):
    # In-process: a subprocess per script would re-import torch each time (4-5 s apiece on 2 cores).
    with pytest.raises(SystemExit) as exit_info:
        script_main(script)(['--help'])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: ')
    # merge_shards.py runs no network and draws nothing: no --device, --batch-size or --seed to offer.
    common = ('--root', '--no-progress') if script in NO_NETWORK_SCRIPTS else \
        ('--root', '--device', '--batch-size', '--seed', '--no-progress')
    for option in ('examples:', *common):
        assert option in out, option


def test_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    import ohlora.weights as weights

    monkeypatch.setenv('OHLORA_NO_DOWNLOAD', '0')

    def refuse(*args, **kwargs):
        raise ConnectionError('offline')

    monkeypatch.setattr('huggingface_hub.hf_hub_download', refuse)
    monkeypatch.setattr(weights, 'offline_reason', lambda url: None)  # the host answers, the download fails
    with pytest.raises(WeightsUnavailable, match='ConnectionError: offline'):
        weights.fetch('v1_generator', Layout(tmp_path / 'root'))
    assert not (tmp_path / 'root').exists()
