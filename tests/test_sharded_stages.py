"""Split stage runs as independent jobs (``--shard i/n``, one after the other here) and ``merge_shards.py``: the
merged root equals one process's byte for byte (stage 3 up to near-tie pixels of the maps); a killed shard resumes;
mixed settings, another split, a missing or unfinished shard are refused in one line and change nothing.
"""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ohlora import atomic
from ohlora.layout import Layout
from rerun_helpers import assert_refused, snapshot
from script_runner import run_script

MERGE = 'merge_shards.py'


def run_split(script: str, args: list, count: int, merge: list) -> None:
    """``script args --shard i/count`` for every i, then ``merge_shards.py merge``."""
    for index in range(count):
        assert run_script(script, *args, '--shard', f'{index}/{count}') == 0
    assert run_script(MERGE, *merge) == 0


# --- stage 1 ------------------------------------------------------------------------------------------------

STAGE1 = 'run_original_generator.py'


def stage1_args(reference_dir, root, *extra):
    return ['--weights', reference_dir / 'genforce' / 'tiny_ckpt.pth', '--num', 7, '--batch-size', 2, '--seed', 5,
            '--style-mixing-prob', 0.5, '--device', 'cpu', '--no-progress', '--root', root, *extra]


def test_stage1_split_and_merged_equals_one_process(tmp_path, reference_dir, capsys):
    assert run_script(STAGE1, *stage1_args(reference_dir, tmp_path / 'whole')) == 0
    whole = snapshot(tmp_path / 'whole')
    for count in (2, 3):
        root = tmp_path / f'split{count}'
        run_split(STAGE1, stage1_args(reference_dir, root), count, ['--stage', 1, '--root', root])
        assert snapshot(root) == whole, count  # images, meta, z record; no shard record left
    out = capsys.readouterr().out
    assert 'shard 2/3: wrote 2 images' in out and 'merged 3 shards: 7 images' in out
    # the merge command a job prints runs as it stands, from the repository root
    assert f'merge them: python stylegan_and_segmentation/merge_shards.py --stage 1 --root {tmp_path / "split3"}' in out

    # A finished root: the shards write nothing but their records, the merge nothing but removes them.
    root = tmp_path / 'split2'
    run_split(STAGE1, stage1_args(reference_dir, root), 2, ['--stage', 1, '--root', root])
    assert snapshot(root) == whole


def test_stage1_killed_shard_resumes_and_the_merge_waits_for_it(tmp_path, reference_dir, capsys, monkeypatch):
    import stylegan.sampling as sampling

    assert run_script(STAGE1, *stage1_args(reference_dir, tmp_path / 'whole')) == 0
    root = tmp_path / 'split'
    assert run_script(STAGE1, *stage1_args(reference_dir, root, '--shard', '0/2')) == 0
    render, calls = sampling.render_sampled, []

    def dies_in_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(sampling, 'render_sampled', dies_in_the_second_batch)
    assert run_script(STAGE1, *stage1_args(reference_dir, root, '--shard', '1/2')) == 130
    monkeypatch.setattr(sampling, 'render_sampled', render)
    assert sorted(p.name for p in Layout(root).synthesized_dir.iterdir()) == [
        '000000.jpg', '000001.jpg', '000002.jpg', '000003.jpg', '000004.jpg', '000005.jpg']
    assert_refused(capsys, root, MERGE, '--stage', 1, '--root', root, match='shard 1/2 has not finished')
    # the images of the killed shard are vouched for by its record: a plain run would refuse, the shard resumes
    assert_refused(capsys, root, STAGE1, *stage1_args(reference_dir, root), match='not merged')
    assert run_script(STAGE1, *stage1_args(reference_dir, root, '--shard', '1/2')) == 0
    assert run_script(MERGE, '--stage', 1, '--root', root) == 0
    assert snapshot(root) == snapshot(tmp_path / 'whole')


def test_stage1_refusals_are_one_line_and_change_nothing(tmp_path, reference_dir, capsys):
    root = tmp_path / 'root'
    assert run_script(STAGE1, *stage1_args(reference_dir, root, '--shard', '0/2')) == 0
    assert_refused(capsys, root, MERGE, '--stage', 1, '--root', root,
                   match='shard 1/2 has no record in ')
    assert_refused(capsys, root, STAGE1, *stage1_args(reference_dir, root, '--shard', '1/2', '--seed', 6),
                   match='was run with other settings (settings.seed 5 -> 6)')
    assert_refused(capsys, root, STAGE1, *stage1_args(reference_dir, root, '--shard', '1/2', '--batch-size', 3),
                   match='batch_size 2 -> 3')
    assert_refused(capsys, root, STAGE1, *stage1_args(reference_dir, root, '--shard', '1/3'),
                   match='split into 2 shards; run the same split (--shard i/2)')
    assert_refused(capsys, root, STAGE1, *stage1_args(reference_dir, root, '--amp', '--shard', '1/2'),
                   match="settings.amp None -> 'bfloat16'")
    for bad in ('2/2', '1-2', '0/0'):
        assert_refused(capsys, root, STAGE1, *stage1_args(reference_dir, root, '--shard', bad), match='--shard')
    assert_refused(capsys, root, MERGE, '--stage', 1, '--root', tmp_path / 'empty', match='holds no shard records')
    # a shard record that is not ours
    records = Layout(root).shard_records('1')
    (records.folder / 'shard_1_of_2.json').write_text('[]')
    assert_refused(capsys, root, MERGE, '--stage', 1, '--root', root, match='is not a shard record')


# --- stage 6 ------------------------------------------------------------------------------------------------

STAGE6 = 'run_fine_tuned_generator.py'


@pytest.fixture(scope='module')
def stage6_inputs(cond_stylegan_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp('stage6_inputs')
    torch.save(cond_stylegan_tiny['state_dicts']['v3_generator'], folder / 'v3.pth')
    pd.DataFrame([np.random.default_rng(1).standard_normal(32)], columns=[str(k) for k in range(32)]).to_csv(
        folder / 'z.csv', index=False)
    return folder


@pytest.mark.parametrize('sweep', [[], ['--sweep', 'eyes', '--values', '-1,0,1']])
def test_stage6_split_and_merged_equals_one_process(tmp_path, stage6_inputs, sweep):
    def args(root):
        return ['--weights', stage6_inputs / 'v3.pth', '--z-csv', stage6_inputs / 'z.csv', '--num', 3,
                '--batch-size', 2, '--device', 'cpu', '--no-progress', '--root', root, *sweep]

    assert run_script(STAGE6, *args(tmp_path / 'whole')) == 0
    merge = ['--stage', 6, '--root', tmp_path / 'split'] + (['--sweep', 'eyes'] if sweep else [])
    run_split(STAGE6, args(tmp_path / 'split'), 2, merge)
    assert snapshot(tmp_path / 'split') == snapshot(tmp_path / 'whole')  # images, settings, z record, grid


def test_stage6_merge_refuses_a_deleted_image(tmp_path, stage6_inputs, capsys):
    root = tmp_path / 'split'
    args = ['--weights', stage6_inputs / 'v3.pth', '--z-csv', stage6_inputs / 'z.csv', '--num', 4, '--batch-size', 1,
            '--device', 'cpu', '--no-progress', '--root', root]
    for index in range(2):
        assert run_script(STAGE6, *args, '--shard', f'{index}/2') == 0
    folder = Layout(root).final_inference_dir('v3')
    (folder / '000003.jpg').unlink()
    assert_refused(capsys, root, MERGE, '--stage', 6, '--root', root,
                   match='000003.jpg is missing, although every shard finished (deleted since?); rerun shard 1/2')


# --- stage 2 scoring ----------------------------------------------------------------------------------------

STAGE2 = 'run_cnn.py'
COLOURS = [(40, 230), (230, 230), (230, 230), (230, 40), (40, 230), (230, 200), (200, 240)]


@pytest.fixture(scope='module')
def cnn_weights(tmp_path_factory):
    from test_stage2_cnn_script import FOLD_BIAS, channel_net

    folder = tmp_path_factory.mktemp('cnn_weights')
    for prop in ('gender', 'quality'):
        for fold, bias in enumerate(FOLD_BIAS):
            atomic.torch_save(folder / f'{prop}_model_{fold}.pt', channel_net(prop, bias))
    return folder


def draw_stage1(root):
    from test_stage2_cnn_script import LABELS_CSV

    layout = Layout(root)
    for img_no, (red, green) in enumerate(COLOURS):
        rgb = np.zeros((256, 256, 3), np.uint8)
        rgb[..., 0], rgb[..., 1], rgb[..., 2] = red, green, 90
        rgb[::7, ::5, 2] = 20 + img_no  # texture: convolutions see more than a flat colour
        atomic.write_image(layout.synthesized_image(img_no), rgb[:, :, ::-1])
    (layout.synthesized_dir / '000006.jpg').write_bytes(b'not a jpeg')  # skipped by its shard, reported by the merge
    atomic.write_json(layout.synthesized_meta, {'source': 'sampled', 'recipe': {'seed': 0}})
    (root / 'labels.csv').write_text(LABELS_CSV)


def test_stage2_split_scoring_merged_equals_one_process(tmp_path, cnn_weights, capsys):
    def args(root, *extra):
        return ['--root', root, '--weights', cnn_weights, '--labels', root / 'labels.csv', '--device', 'cpu',
                '--workers', 0, '--no-progress', '--batch-size', 2, *extra]

    for name in ('whole', 'split'):
        draw_stage1(tmp_path / name)
    assert run_script(STAGE2, *args(tmp_path / 'whole')) == 0
    whole_out = capsys.readouterr().out
    split = tmp_path / 'split'
    for index in range(2):
        assert run_script(STAGE2, *args(split, '--shard', f'{index}/2')) == 0
    assert not Layout(split).cnn_merged_csv.exists() and not Layout(split).filtered_dir.exists()
    out = capsys.readouterr().out  # batches [2, 3], [4, 5], [6]: shard 0 takes the first and the last
    assert 'shard 0/2: scored 2 images (reused 0 scores, 1 unreadable)' in out
    assert 'shard 1/2: scored 2 images (reused 0 scores)' in out
    assert run_script(MERGE, '--stage', 2, '--root', split) == 0
    merged_out = capsys.readouterr().out
    # score CSVs, scoring record, merged CSV, filtered folder: the same bytes
    assert snapshot(split) == snapshot(tmp_path / 'whole')
    assert merged_out.replace(str(split), str(tmp_path / 'whole')).splitlines()[-2:] == whole_out.splitlines()[-2:]
    assert pd.read_csv(Layout(split).cnn_inference_csv('gender'))['img_no'].tolist() == [2, 3, 4, 5]

    # Split again with --amp: the shards rescore (other settings) and the merged scores stay close to float32.
    for index in range(2):
        assert run_script(STAGE2, *args(split, '--shard', f'{index}/2', '--amp')) == 0
    assert run_script(MERGE, '--stage', 2, '--root', split) == 0
    amp = pd.read_csv(Layout(split).cnn_inference_csv('quality'))
    fp32 = pd.read_csv(Layout(tmp_path / 'whole').cnn_inference_csv('quality'))
    assert np.abs(amp['property_quality_final_score'] - fp32['property_quality_final_score']).max() <= 0.02
    assert json.loads(Layout(split).cnn_scoring_record.read_text())['settings']['amp'] == 'bfloat16'


def test_stage2_split_after_earlier_scores_equals_one_process_with_dropout(tmp_path, cnn_weights, capsys):
    """Scores of an earlier run (over fewer stage-1 images) are reused and one process scores the rest in batches
    from the first of them; with --compat upstream the dropout draws depend on those batches, so the shards must
    split the same batches (not those of every image) for the merge to equal one process."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(8)]

    def draw(root, img_nos):
        layout = Layout(root)
        for img_no in img_nos:
            atomic.write_image(layout.synthesized_image(img_no), images[img_no])
        atomic.write_json(layout.synthesized_meta, {'source': 'sampled', 'recipe': {'seed': 0}})

    def args(root, *extra):
        return ['--root', root, '--weights', cnn_weights, '--device', 'cpu', '--workers', 0, '--no-progress',
                '--batch-size', 2, '--compat', 'upstream', '--seed', 3, *extra]

    for name in ('one', 'split'):
        draw(tmp_path / name, [0])
        assert run_script(STAGE2, *args(tmp_path / name)) == 0  # image 0 scored
        draw(tmp_path / name, range(1, 8))
    assert run_script(STAGE2, *args(tmp_path / 'one')) == 0  # reuses 0, scores [1, 2], [3, 4], [5, 6], [7]
    split = tmp_path / 'split'
    for index in range(2):
        assert run_script(STAGE2, *args(split, '--shard', f'{index}/2')) == 0
    assert run_script(MERGE, '--stage', 2, '--root', split) == 0
    assert snapshot(split) == snapshot(tmp_path / 'one')

    # An image replaced between two shards' runs changes which images are reused, so the shards may split the
    # rest differently: an image scored by two shards is refused by the merge (not written twice into the CSVs).
    root = tmp_path / 'changed'
    draw(root, [0])
    assert run_script(STAGE2, *args(root)) == 0
    draw(root, range(1, 4))
    assert run_script(STAGE2, *args(root, '--shard', '0/2')) == 0  # reuses 0, scores [1, 2] (of [1, 2], [3])
    images[0] = 255 - images[0]
    draw(root, [0])
    assert run_script(STAGE2, *args(root, '--shard', '1/2')) == 0  # 0 changed: scores [2, 3] (of [0, 1], [2, 3])
    assert_refused(capsys, root, MERGE, '--stage', 2, '--root', root, match='was scored by two shards')


def test_stage2_refuses_retrain_with_shard_and_mixed_thresholds(tmp_path, cnn_weights, capsys):
    root = tmp_path / 'root'
    draw_stage1(root)
    base = ['--root', root, '--weights', cnn_weights, '--device', 'cpu', '--workers', 0, '--no-progress']
    assert_refused(capsys, root, STAGE2, '--root', root, '--retrain', '--shard', '0/2', match='--retrain')
    assert run_script(STAGE2, *base, '--shard', '0/2') == 0
    assert_refused(capsys, root, STAGE2, *base, '--shard', '1/2', '--quality-threshold', 0.5,
                   match='quality_threshold 0.9 -> 0.5')
    assert_refused(capsys, root, MERGE, '--stage', 2, '--root', root, match='shard 1/2 has no record')


def test_stage2_retrain_over_an_unmerged_split_is_refused_before_training(tmp_path, cnn_weights, capsys,
                                                                          monkeypatch):
    """A plain run over an unmerged split is refused; with --retrain too, before the fold models are retrained
    (hours of training, and the installed models replaced) rather than after."""
    import cnn.stage2 as stage2

    root = tmp_path / 'root'
    draw_stage1(root)
    assert run_script(STAGE2, '--root', root, '--weights', cnn_weights, '--device', 'cpu', '--workers', 0,
                      '--no-progress', '--shard', '0/2') == 0
    models = Layout(root).cnn_models_dir

    def retrain(request, layout, labels, device):  # stands for the training, which installs new fold models
        shutil.copytree(cnn_weights, models)
        return {}

    monkeypatch.setattr(stage2, 'retrain', retrain)
    assert_refused(capsys, root, STAGE2, '--root', root, '--labels', root / 'labels.csv', '--retrain', '--device',
                   'cpu', '--workers', 0, '--no-progress', match='was not merged')


# --- stage 3 ------------------------------------------------------------------------------------------------

STAGE3 = 'run_segmentation.py'


def stage3_inputs(folder, facexformer_dir):
    """Faces, a faceless image and a corrupt file (both skipped) in a filtered-images folder."""
    from test_stage3_segmentation import drawn_on_canvas, noise_image

    folder.mkdir(parents=True)
    shutil.copy(facexformer_dir / 'astronaut.png', folder / '000001.png')
    Image.open(facexformer_dir / 'astronaut.png').convert('L').save(folder / '000004.jpg')
    drawn_on_canvas(facexformer_dir).save(folder / '000005.jpg', quality=95)
    noise_image().save(folder / '000009.jpg')
    shutil.copy(facexformer_dir / 'drawn_face_A.png', folder / '000012.png')
    (folder / '000013.jpg').write_bytes(b'\xff\xd8 not a jpeg')


def maps_equal_but_near_ties(split: dict, whole: dict) -> None:
    """Equal files, except parsing maps (and their visualisations) that may differ at a few near-tie pixels:
    which faces share a FaceXFormer batch differs between a split run and one process."""
    import cv2

    assert split.keys() == whole.keys()
    for name, data in whole.items():
        if split[name] == data:
            continue
        assert name.rsplit('/', 1)[-1].startswith(('parsing_', 'parsing_visualization_')), name
        a = cv2.imdecode(np.frombuffer(split[name], np.uint8), cv2.IMREAD_UNCHANGED).astype(int)
        b = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).astype(int)
        differs = (a != b).reshape(224, 224, -1).any(axis=2)
        assert differs.sum() <= 3, name


def test_stage3_split_and_merged_equals_one_process(tmp_path, synthetic_facexformer, facexformer_dir, capsys):
    def args(root, *extra):
        return ['--weights', synthetic_facexformer, '--device', 'cpu', '--no-progress', '--batch-size', 2,
                '--root', root, *extra]

    for name in ('whole', 'split'):
        stage3_inputs(Layout(tmp_path / name).filtered_dir, facexformer_dir)
    assert run_script(STAGE3, *args(tmp_path / 'whole')) == 0
    split = tmp_path / 'split'
    for index in range(2):
        assert run_script(STAGE3, *args(split, '--shard', f'{index}/2')) == 0
    assert not Layout(split).segmentation_meta.exists() and not Layout(split).segmentation_skipped_csv.exists()
    assert run_script(MERGE, '--stage', 3, '--root', split) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith('parsed 4 images (0 already there); skipped 2')
    whole = snapshot(tmp_path / 'whole')
    maps_equal_but_near_ties(snapshot(split), whole)
    layout = Layout(split)
    assert layout.segmentation_meta.read_bytes() == whole['segmentation/segmentation_results/segmentation_meta.json']
    assert pd.read_csv(layout.segmentation_skipped_csv)['img_no'].tolist() == [9, 13]

    # A rerun of the split after the merge: nothing to parse, nothing changes.
    before = snapshot(split)
    run_split(STAGE3, args(split), 2, ['--stage', 3, '--root', split])
    assert snapshot(split) == before


# --- the directions' sampling -------------------------------------------------------------------------------

DIRECTIONS = 'find_attribute_directions.py'


def test_directions_sampling_split_merged_and_fitted_equals_one_process(tmp_path, reference_dir, capsys):
    from stylegan_modified.directions_file import read_directions
    from stylegan_modified.property_score_cnn import PropertyScoreCNN

    torch.manual_seed(0)
    torch.save(PropertyScoreCNN().state_dict(), tmp_path / 'cnn.pth')

    def args(root, *extra):
        return ['--weights', reference_dir / 'genforce' / 'tiny_ckpt.pth', '--property-cnn', tmp_path / 'cnn.pth',
                '--num', 10, '--holdout', 0.25, '--chunk-size', 3, '--batch-size', 3, '--device', 'cpu',
                '--no-progress', '--root', root, *extra]

    assert run_script(DIRECTIONS, *args(tmp_path / 'whole')) == 0
    split = tmp_path / 'split'
    for index in range(3):
        assert run_script(DIRECTIONS, *args(split, '--shard', f'{index}/3')) == 0
    assert 'shard 2/3: sampled 3 images' in capsys.readouterr().out
    assert not (split / 'stylegan_modified' / 'attribute_directions.pt').exists()
    assert_refused(capsys, split, DIRECTIONS, *args(split), match='not merged')
    assert run_script(MERGE, '--stage', 'directions', '--root', split) == 0
    assert run_script(DIRECTIONS, *args(split)) == 0
    assert '(0 sampled now, 10 reused' in capsys.readouterr().out
    samples = 'stylegan_modified/attribute_direction_samples'
    assert {k: v for k, v in snapshot(split).items() if k.startswith(samples)} == \
        {k: v for k, v in snapshot(tmp_path / 'whole').items() if k.startswith(samples)}
    whole, parts = (read_directions(root / 'stylegan_modified' / 'attribute_directions.pt')
                    for root in (tmp_path / 'whole', split))
    for key in ('weights', 'intercepts', 'directions'):
        assert torch.equal(getattr(whole, key), getattr(parts, key))


def test_directions_shards_refuse_another_batch_size(tmp_path, reference_dir, capsys):
    """A chunk's numbers depend on the batches it is rendered in: a shard with another --batch-size than the shards
    already there would make a merged folder that is not the one-process folder, so it is refused like stage 1's."""
    from stylegan_modified.property_score_cnn import PropertyScoreCNN

    torch.manual_seed(0)
    torch.save(PropertyScoreCNN().state_dict(), tmp_path / 'cnn.pth')

    def args(batch_size, shard):
        return ['--weights', reference_dir / 'genforce' / 'tiny_ckpt.pth', '--property-cnn', tmp_path / 'cnn.pth',
                '--num', 10, '--holdout', 0.25, '--chunk-size', 3, '--batch-size', batch_size, '--device', 'cpu', '--no-progress',
                '--root', tmp_path / 'split', '--shard', shard]

    assert run_script(DIRECTIONS, *args(3, '0/2')) == 0
    assert_refused(capsys, tmp_path / 'split', DIRECTIONS, *args(1, '1/2'), match='batch_size 3 -> 1')


def test_a_job_never_removes_the_temporaries_of_another_machine(tmp_path):
    """Jobs on several machines write into one shared folder: a job removes the temporaries of dead processes of
    its own machine only (another machine's process ids mean nothing here)."""
    import subprocess
    import sys

    from ohlora.atomic import HOST_TAG, remove_stale_temporaries, temporary_name

    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    other_host = 'f' * 8 if HOST_TAG != 'f' * 8 else '0' * 8
    mine = tmp_path / f'.tmp-{dead.pid}h{HOST_TAG}-ab12.jpg'
    legacy = tmp_path / f'.tmp-{dead.pid}-cd34.jpg'  # written before names held the host: this machine's
    theirs = tmp_path / f'.tmp-{dead.pid}h{other_host}-ef56.jpg'
    for path in (mine, legacy, theirs):
        path.write_bytes(b'')
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([mine, legacy])
    assert theirs.exists()
    assert temporary_name(tmp_path / 'x.jpg').name.startswith(f'.tmp-{os.getpid()}h{HOST_TAG}-')
