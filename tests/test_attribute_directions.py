"""Attribute directions in w: sampling (resumable), ridge / svm / orthogonal fits, absolute-target edits,
the directions file and DirectionsControl, on constructed generators with known answers and on the tiny
GenForce checkpoint."""
import shutil

import numpy as np
import pytest
import torch
from torch.nn.functional import cosine_similarity

from direction_toys import FailingScorer, LinearScorer, LinearToy, PooledScorer, random_model
from ohlora.constants import PROPERTY_NAMES
from ohlora.errors import PipelineError
from ohlora.layout import DirectionSamplesFolder
from ohlora.records import sha256_of
from stylegan.checkpoint import load_generator
from stylegan_modified.attribute_directions import DirectionsControl, load_directions_control
from stylegan_modified.controllable import ControllableGenerator
from stylegan_modified.direction_fitting import FitOptions, fit_directions, holdout_split, minimum_samples
from stylegan_modified.direction_sampling import SampleSettings, file_identity, sample_w_and_scores
from stylegan_modified.directions_file import AttributeDirections, read_directions, write_directions
from stylegan_modified.w_space import StyleGANW, broadcast_w, parse_layers

DIM, LAYERS, SIGMA = 16, 4, 0.1
EYES, MOUTH, POSE = (PROPERTY_NAMES.index(a) for a in ('eyes', 'mouth', 'pose'))
CONTROLLED = [EYES, MOUTH, POSE]
HELD = [PROPERTY_NAMES.index(a) for a in PROPERTY_NAMES if a not in ('eyes', 'mouth', 'pose')]
TOY_RECORD = {'kind': 'toy', 'file': 'toy', 'sha256': '0' * 64, 'z_dim': DIM, 'w_dim': DIM, 'label': None}


def settings(seed=0, chunk_size=500, dim=DIM, layers=LAYERS, scorer='linear'):
    return SampleSettings(generator={**TOY_RECORD, 'z_dim': dim, 'w_dim': dim}, scorer={'kind': scorer}, seed=seed,
                          z_dim=dim, w_dim=dim, num_layers=layers, chunk_size=chunk_size)


def fit(samples_or_w, scores=None, **options):
    w, s = (samples_or_w.w, samples_or_w.scores) if scores is None else (samples_or_w, scores)
    return fit_directions(w, s, FitOptions(**options), generator=TOY_RECORD, layers=(0, LAYERS - 1), num=len(w))


@pytest.fixture(scope='module')
def anisotropic(tmp_path_factory):
    """4,000 samples of a toy whose w is correlated across dimensions; scores linear in w + noise 0.1."""
    toy = LinearToy(DIM, LAYERS, mixing=0.5)
    weights, intercepts = random_model(DIM)
    scorer = LinearScorer(weights, intercepts, SIGMA)
    files = DirectionSamplesFolder(tmp_path_factory.mktemp('samples'))
    samples = sample_w_and_scores(toy, scorer, files, settings(), 4000, 256, progress=False)
    return toy, scorer, weights, intercepts, samples


def test_sampling_records_w_and_scores_of_seeded_z(anisotropic):
    toy, scorer, _, _, samples = anisotropic
    assert samples.w.shape == (4000, DIM) and samples.scores.shape == (4000, 7) and samples.computed == 4000
    from stylegan.sampling import sampled_latent
    z = torch.stack([sampled_latent(0, n, DIM) for n in (0, 1234, 3999)])
    # image i's z comes from (seed, i) alone (equal up to the rounding of another batch shape)
    torch.testing.assert_close(samples.w[[0, 1234, 3999]], toy.w(z), rtol=0, atol=1e-6)
    torch.testing.assert_close(samples.scores[[0, 1234, 3999]], scorer.exact(toy.w(z)), rtol=0, atol=3 * SIGMA)


def test_ridge_recovers_each_direction_and_its_scale(anisotropic):
    _, _, weights, intercepts, samples = anisotropic
    directions = fit(samples)  # ridge is the default
    assert directions.method == 'ridge' and directions.attributes == ('eyes', 'mouth', 'pose')
    truth = weights[CONTROLLED].double()
    assert cosine_similarity(directions.normals[0], truth, dim=1).min() >= 0.99
    torch.testing.assert_close(directions.slopes[0], truth.norm(dim=1), rtol=0.01, atol=0)  # score per unit step
    torch.testing.assert_close(directions.weights[0], truth, atol=0.02, rtol=0)
    torch.testing.assert_close(directions.intercepts[0], intercepts[CONTROLLED].double(), atol=0.02, rtol=0)
    for name in directions.attributes:
        assert directions.fit_quality[name]['r2'] > 0.99 and directions.fit_quality[name]['r'] > 0.99
        assert directions.fit_quality[name]['n_test'] == 400  # the 10 % held out


def test_svm_recovers_the_direction_and_a_calibration():
    gen = torch.Generator().manual_seed(7)
    weights, intercepts = random_model(DIM, seed=7)
    w = torch.randn(3000, DIM, generator=gen)  # isotropic w
    scores = w @ weights.T + intercepts + SIGMA * torch.randn(3000, 7, generator=gen)
    directions = fit(w, scores, method='svm')
    truth = weights[CONTROLLED].double()
    assert cosine_similarity(directions.normals[0], truth, dim=1).min() >= 0.995
    torch.testing.assert_close(directions.slopes[0], truth.norm(dim=1), rtol=0.02, atol=0)
    assert all(directions.fit_quality[a]['accuracy'] == 1.0 for a in directions.attributes)
    assert directions.options['fraction'] == 0.2


def test_svm_groups_fit_one_direction_per_median_group():
    """Eyes' true direction depends on the group (hair colour, hair length, background above their medians)."""
    gen = torch.Generator().manual_seed(0)
    weights, intercepts = random_model(DIM, seed=0)
    offsets = 0.8 * torch.randn(8, DIM, generator=gen)
    w = torch.randn(4000, DIM, generator=gen)
    scores = w @ weights.T + intercepts
    grouping = [PROPERTY_NAMES.index(a) for a in ('hair_color', 'hair_length', 'background_mean')]
    group = ((scores[:, grouping] > intercepts[grouping]).long() @ torch.tensor([4, 2, 1]))
    scores[:, EYES] = (w * (weights[EYES] + offsets[group])).sum(1) + intercepts[EYES]
    scores += SIGMA * torch.randn(scores.shape, generator=gen)
    directions = fit(w, scores, method='svm', groups=True)
    assert directions.normals.shape == (8, 3, DIM) and directions.group_attributes == ('hair_color', 'hair_length',
                                                                                       'background_mean')
    own = cosine_similarity(directions.normals[:, 0], (weights[EYES] + offsets).double(), dim=1)
    shared = cosine_similarity(directions.normals[:, 0], weights[EYES].double().expand(8, -1), dim=1)
    assert own.mean() >= 0.9 and own.mean() > shared.mean() + 0.1
    assert directions.fit_quality['group_agreement'] >= 0.9  # the group chosen from w is the scores' group
    assert len(directions.fit_quality['eyes']['accuracy_per_group']) == 8


def test_absolute_targets_are_hit_within_the_noise(anisotropic):
    toy, scorer, _, _, samples = anisotropic
    control = DirectionsControl(toy, fit(samples))
    assert isinstance(control, ControllableGenerator)
    assert (control.name, control.score_algorithm, control.z_dim) == ('directions', 2, DIM)
    assert control.trained_attributes == ('eyes', 'mouth', 'pose') and control.layers == (0, LAYERS - 1)
    gen = torch.Generator().manual_seed(11)
    z, values = torch.randn(300, DIM, generator=gen), 2.0 * torch.randn(300, 7, generator=gen)
    w, edited = control.edited_w(z, values)
    predicted = control.predicted_scores(edited)
    for column, name in zip(CONTROLLED, control.trained_attributes):
        torch.testing.assert_close(predicted[name], values[:, column].double(), atol=1e-6, rtol=0)
    measured = scorer(control.images(z, values))
    error = (measured[:, CONTROLLED] - values[:, CONTROLLED]).abs()
    assert error.mean() <= 1.5 * SIGMA and error.max() <= 6 * SIGMA
    # the requested values of attributes the directions do not control change nothing
    other = values.clone()
    other[:, HELD] += 5.0
    assert torch.equal(control.images(z, other), control.images(z, values))


def test_the_edit_is_the_minimum_norm_move(anisotropic):
    toy, _, _, _, samples = anisotropic
    directions = fit(samples)
    w = samples.w[:50]
    targets = torch.randn(50, 3, generator=torch.Generator().manual_seed(3))
    delta = (directions.edit(w, targets) - w).double()
    rows = directions.weights[0]  # [3, d]: the move lies in the span of the constraint rows
    in_span = delta @ torch.linalg.pinv(rows) @ rows
    torch.testing.assert_close(in_span, delta, atol=1e-5, rtol=0)
    current = directions.predict(w)
    torch.testing.assert_close(directions.edit(w, current.float()), w, atol=1e-5, rtol=0)  # at target: no move


def test_orthogonal_projects_each_direction_off_the_others_and_cuts_leakage(tmp_path):
    """hair_color shares cosine 0.8 with eyes: moving eyes moves hair_color unless it is held."""
    toy = LinearToy(DIM, LAYERS)
    weights, intercepts = random_model(DIM, seed=4, correlated=0.8)
    scorer = LinearScorer(weights, intercepts, SIGMA)
    samples = sample_w_and_scores(toy, scorer, DirectionSamplesFolder(tmp_path), settings(), 3000, 500,
                                  progress=False)
    plain, orthogonal = fit(samples), fit(samples, orthogonal=True)
    assert orthogonal.held_attributes == tuple(PROPERTY_NAMES[i] for i in HELD)
    dots = orthogonal.directions[0] @ orthogonal.normals[0].T  # [3 controlled, 7 fitted]
    others = torch.ones_like(dots)
    others[range(3), range(3)] = 0
    off_diagonal = dots * others
    assert off_diagonal.abs().max() < 1e-8  # each edit direction is orthogonal to every other fitted direction
    assert (torch.diagonal(dots) > 0.3).all()
    assert (plain.directions[0, 0] @ orthogonal.normals[0, 3]).abs() > 0.5  # without: eyes' direction moves hair

    gen = torch.Generator().manual_seed(12)
    z = torch.randn(200, DIM, generator=gen)
    before = scorer.exact(toy.w(z))
    values = torch.zeros(200, 7)
    values[:, CONTROLLED] = before[:, CONTROLLED]
    values[:, EYES] += 2.0  # eyes +2, mouth and pose as they were
    leak = {}
    for name, directions in (('plain', plain), ('orthogonal', orthogonal)):
        measured = scorer(DirectionsControl(toy, directions).images(z, values))
        assert (measured[:, EYES] - values[:, EYES]).abs().mean() <= 1.5 * SIGMA
        leak[name] = (measured[:, HELD[0]] - before[:, HELD[0]]).abs().mean().item()
    # plain: hair_color moves by about 0.8 * |A_hair| * 2 / |A_eyes| ≈ 1; held: only the noise is left
    assert leak['plain'] > 0.5 and leak['orthogonal'] <= 1.5 * SIGMA and leak['plain'] > 5 * leak['orthogonal']


def test_resumed_sampling_equals_an_uninterrupted_run(tmp_path):
    toy, (weights, intercepts) = LinearToy(DIM, LAYERS, mixing=1.0), random_model(DIM)
    whole = DirectionSamplesFolder(tmp_path / 'whole')
    reference = sample_w_and_scores(toy, LinearScorer(weights, intercepts), whole, settings(chunk_size=10), 47, 4,
                                    progress=False)
    parts = DirectionSamplesFolder(tmp_path / 'parts')
    with pytest.raises(KeyboardInterrupt):  # dies in the 9th batch: chunks 0-2 (4 + 4 + 2 rows each) + 1 done
        sample_w_and_scores(toy, FailingScorer(LinearScorer(weights, intercepts), 8), parts, settings(chunk_size=10),
                            47, 4, progress=False)
    assert [p.name for p in parts.chunk_files()] == ['chunk_000000.pt', 'chunk_000001.pt']
    scorer = LinearScorer(weights, intercepts)
    resumed = sample_w_and_scores(toy, scorer, parts, settings(chunk_size=10), 47, 4, progress=False)
    assert (resumed.reused, resumed.computed) == (20, 27)
    assert torch.equal(resumed.w, reference.w) and torch.equal(resumed.scores, reference.scores)
    for a, b in zip(whole.chunk_files(), parts.chunk_files()):
        assert a.read_bytes() == b.read_bytes()
    again = sample_w_and_scores(toy, scorer, parts, settings(chunk_size=10), 47, 4, progress=False)
    assert (again.reused, again.computed) == (47, 0) and torch.equal(again.w, reference.w)
    # more samples later: the short last chunk is computed again in full, the others reused
    longer = sample_w_and_scores(toy, scorer, parts, settings(chunk_size=10), 55, 4, progress=False)
    fresh = sample_w_and_scores(toy, scorer, DirectionSamplesFolder(tmp_path / 'fresh'), settings(chunk_size=10),
                                55, 4, progress=False)
    assert (longer.reused, longer.computed) == (40, 15) and torch.equal(longer.w, fresh.w)


def test_samples_of_other_settings_are_refused_in_one_line(tmp_path):
    toy, (weights, intercepts) = LinearToy(DIM, LAYERS), random_model(DIM)
    files = DirectionSamplesFolder(tmp_path / 's')
    sample_w_and_scores(toy, LinearScorer(weights, intercepts), files, settings(), 12, 4, progress=False)
    before = {p.name: p.read_bytes() for p in files.folder.iterdir()}
    for changed in (settings(seed=1), settings(scorer='another cnn'), settings(chunk_size=6)):
        with pytest.raises(PipelineError, match='other settings') as error:
            sample_w_and_scores(toy, LinearScorer(weights, intercepts), files, changed, 12, 4, progress=False)
        assert '\n' not in str(error.value)
    assert {p.name: p.read_bytes() for p in files.folder.iterdir()} == before
    files.settings_json.unlink()
    with pytest.raises(PipelineError, match='no samples_settings.json'):
        sample_w_and_scores(toy, LinearScorer(weights, intercepts), files, settings(), 12, 4, progress=False)


def test_fit_options_and_sample_counts_are_checked():
    w, scores = torch.randn(30, DIM), torch.randn(30, 7)
    for options, message in ((dict(method='lasso'), '--method'), (dict(attributes=('eyes', 'nose')), 'nose'),
                             (dict(attributes=('eyes', 'eyes')), 'each once'), (dict(method='svm', fraction=0.7), '--fraction'),
                             (dict(holdout=1.0), '--holdout'), (dict(groups=True), 'svm only'), (dict(alpha=-1.0), '--alpha')):
        with pytest.raises(PipelineError, match=message):
            fit(w, scores, **options)
    assert minimum_samples(FitOptions()) == 22 and minimum_samples(FitOptions(method='svm', groups=True)) > 80
    with pytest.raises(PipelineError, match='too few'):
        fit(w[:10], scores[:10])
    constant = scores.clone()
    constant[:, MOUTH] = 1.0
    with pytest.raises(PipelineError, match='mouth do not vary'):
        fit(w, constant)
    train, test = holdout_split(100, 0.1, 0)
    assert len(test) == 10 and sorted([*train, *test]) == list(range(100))
    assert torch.equal(torch.from_numpy(holdout_split(100, 0.1, 0)[1]), torch.from_numpy(test))


def test_layer_ranges():
    assert parse_layers('all', 14) == (0, 13) and parse_layers(None, 14) == (0, 13)
    assert parse_layers('0-7', 14) == (0, 7) and parse_layers('5', 14) == (5, 5) and parse_layers((2, 3), 14) == (2, 3)
    for bad in ('0-14', '7-3', 'coarse', '-1'):
        with pytest.raises(PipelineError, match='--layers'):
            parse_layers(bad, 14)
    with pytest.raises(PipelineError, match=r"--layers 3-1: the first layer is after the last \(first > last\); "
                                            r'write the range as 1-3'):
        parse_layers('3-1', 14)
    with pytest.raises(PipelineError, match=r"--layers 2-20 is outside the generator's layers 0..13$"):
        parse_layers('2-20', 14)


def test_directions_file_round_trip_and_refusals(anisotropic, tmp_path):
    directions = fit(anisotropic[4], orthogonal=True)
    path = tmp_path / 'dirs.pt'
    write_directions(path, directions)
    raw = torch.load(path, map_location='cpu', weights_only=True)  # plain types and tensors only
    assert raw['format'] == 'ohlora-attribute-directions' and raw['method'] == 'ridge'
    back = read_directions(path)
    for key in ('weights', 'intercepts', 'normals', 'slopes', 'directions'):
        assert torch.equal(getattr(back, key), getattr(directions, key))
    assert back.fit_quality == directions.fit_quality and back.layers == (0, LAYERS - 1)

    def refused(record, message, name):
        bad = tmp_path / name
        torch.save(record, bad)
        with pytest.raises(PipelineError, match=message) as error:
            read_directions(bad)
        assert '\n' not in str(error.value) and str(bad) in str(error.value)

    refused({'weights': torch.zeros(3)}, 'not an attribute-directions file', 'foreign.pt')
    refused({**raw, 'version': 99}, 'format version 99', 'version.pt')
    nan = raw['weights'].clone()
    nan[0, 0, 0] = float('nan')
    refused({**raw, 'weights': nan}, 'NaN or infinite', 'nan.pt')
    refused({**raw, 'directions': raw['directions'][:, :2]}, 'directions of shape', 'shape.pt')
    refused({**raw, 'attributes': ['eyes', 'nose']}, 'invalid attributes', 'names.pt')
    original = {**raw['generator'], 'kind': 'original'}
    refused({**raw, 'generator': {**original, 'label': [0.0] * 7}},
            r'gives the unconditional base generator \(original\) a sampling label \[0.0, 0.0', 'label.pt')
    for label in (None, [0.0] * 6, [float('nan')] * 7, ['a'] * 7, [True] * 7):
        refused({**raw, 'generator': {**original, 'kind': 'v1', 'label': label}},
                'for the v1 base generator; it needs 7 finite numbers', 'v1_label.pt')
    refused({**raw, 'generator': {**original, 'label': None, 'z_dim': '16'}}, "invalid base generator z_dim '16'",
            'z_dim.pt')
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(PipelineError, match='truncated or corrupt'):
        read_directions(truncated)
    with pytest.raises(PipelineError, match='no such file'):
        read_directions(tmp_path / 'missing.pt')


def test_edits_apply_to_the_chosen_layers_only(anisotropic):
    toy, _, _, _, samples = anisotropic
    directions = fit(samples)
    z, values = torch.randn(5, DIM), torch.randn(5, 7)
    control = DirectionsControl(toy, directions, layers='1-2')
    w, edited = control.edited_w(z, values)
    wp = control.images(z, values)[:, 0]
    assert torch.equal(wp[:, 0], w) and torch.equal(wp[:, 3], w)
    assert torch.equal(wp[:, 1], edited) and torch.equal(wp[:, 2], edited)
    with pytest.raises(PipelineError, match='--layers'):
        DirectionsControl(toy, directions, layers='0-4')


def test_the_library_path_on_the_tiny_genforce_checkpoint(reference_dir, tmp_path):
    """sample -> fit -> write -> load_directions_control -> images, on the tiny 256 px GenForce G (z 64)."""
    checkpoint = reference_dir / 'genforce' / 'tiny_ckpt.pth'
    generator = load_generator(checkpoint)
    w_generator = StyleGANW(generator)
    assert (w_generator.z_dim, w_generator.w_dim, w_generator.num_layers) == (64, 64, 14)
    record = {'kind': 'original', **file_identity(checkpoint), 'label': None, 'z_dim': 64, 'w_dim': 64,
              'num_layers': 14}
    scorer = PooledScorer()
    sample_settings = SampleSettings(generator=record, scorer={'kind': 'pooled'}, seed=3, z_dim=64, w_dim=64,
                                     num_layers=14, chunk_size=40)
    files = DirectionSamplesFolder(tmp_path / 'samples')
    samples = sample_w_and_scores(w_generator, scorer, files, sample_settings, 100, 20, save_images=True,
                                  progress=False)
    assert sorted(p.name for p in files.images_dir.iterdir())[:2] == ['000000.jpg', '000001.jpg']
    assert len(list(files.images_dir.iterdir())) == 100
    with torch.no_grad():  # the recorded w and scores are those of the generator's own forward
        expected = generator(samples_z(3, [7], 64), trunc_psi=1.0, trunc_layers=0, randomize_noise=False)
    torch.testing.assert_close(samples.w[7:8], expected['w'], rtol=0, atol=1e-5)
    torch.testing.assert_close(samples.scores[7:8], scorer(expected['image']), rtol=0, atol=1e-5)

    directions = fit_directions(samples.w, samples.scores, FitOptions(), generator=record,
                                property_cnn={'kind': 'pooled'}, num=100, seed=3, layers=(0, 13))
    path = tmp_path / 'attribute_directions.pt'
    write_directions(path, directions)
    control = load_directions_control(path, checkpoint, 'cpu')
    assert isinstance(control, ControllableGenerator) and control.z_dim == 64
    z = samples_z(9, range(4), 64)
    values = torch.zeros(4, 7)
    values[:, EYES] = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    images = control.images(z, values)
    assert images.shape == (4, 3, 256, 256) and torch.isfinite(images).all()
    w, edited = control.edited_w(z, values)
    torch.testing.assert_close(control.predicted_scores(edited)['eyes'], values[:, EYES].double(), atol=1e-4, rtol=0)
    with torch.no_grad():  # the edited w on every layer, through GenForce's own synthesis
        direct = generator.synthesis(broadcast_w(edited, 14), randomize_noise=False)['image']
    assert torch.equal(images, direct)
    measured = scorer(images)[:, EYES]
    assert torch.all(measured[1:] > measured[:-1])  # the requested order survives the real generator

    other = tmp_path / 'other_ckpt.pth'
    shutil.copy(checkpoint, other)
    with open(other, 'ab') as handle:
        handle.write(b'\0')  # another file: refused on its hash, before it is even loaded
    with pytest.raises(PipelineError, match='SHA-256 differs'):
        load_directions_control(path, other, 'cpu')
    assert sha256_of(checkpoint) == directions.generator['sha256']


def samples_z(seed, numbers, z_dim):
    from stylegan.sampling import sampled_latent
    return torch.stack([sampled_latent(seed, n, z_dim) for n in numbers])


def test_conditional_base_maps_with_the_recorded_label(reference_dir, tmp_path):
    from stylegan_modified.checkpoint import load_conditional_generator
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    torch.save(tiny['state_dicts']['v1_generator'], tmp_path / 'v1.pth')
    generator = load_conditional_generator(tmp_path / 'v1.pth', 'v1')
    view = StyleGANW(generator)
    z = torch.randn(2, 32)
    assert torch.equal(view.w(z), generator.mapping(z, torch.zeros(2, 7))['w'])  # label 0 by default
    record = {'kind': 'v1', 'file': 'v1.pth', 'sha256': '0' * 64, 'z_dim': 32, 'w_dim': 32, 'label': [0.5] * 7}
    directions = fit_directions(torch.randn(40, 32), torch.randn(40, 7), FitOptions(), generator=record,
                                layers=(0, 13))
    control = DirectionsControl(generator, directions)  # maps with the label the samples were drawn with
    w, _ = control.edited_w(z, torch.zeros(2, 7))
    assert torch.equal(w, generator.mapping(z, torch.full((2, 7), 0.5))['w'])


def test_library_seeds_are_derived_for_any_whole_seed():
    from ohlora.devices import item_generator, library_seed, mixed_seed
    seeds = (0, 1, -1, 2 ** 32, 2 ** 33, -(2 ** 40), 2 ** 63 + 5)  # (the mix works modulo 2**64)
    derived = [library_seed(s, 91) for s in seeds]
    assert all(0 <= d < 2 ** 32 for d in derived) and len(set(derived)) == len(seeds)
    assert library_seed(5, 91) == library_seed(5, 91) != library_seed(5, 92)
    # item_generator is unchanged by the refactoring: its seed is the same 64-bit mix, 63 bits kept
    assert item_generator(7, 3, 2).initial_seed() == mixed_seed(7, 3, 2) & (2 ** 63 - 1) == 7367871952057696629
    splits = {s: holdout_split(40, 0.25, s) for s in seeds}
    for s, (train, test) in splits.items():
        assert len(test) == 10 and sorted([*train, *test]) == list(range(40))
        assert all(torch.equal(torch.from_numpy(a), torch.from_numpy(b)) for a, b in zip(holdout_split(40, 0.25, s), (train, test)))
    assert len({tuple(test) for _, test in splits.values()}) == len(seeds)
    gen = torch.Generator().manual_seed(0)
    w, scores = torch.randn(200, DIM, generator=gen), torch.randn(200, 7, generator=gen)
    for seed in (-1, 2 ** 33):
        fit(w, scores, method='svm', seed=seed)  # LinearSVC(random_state=seed) raised InvalidParameterError


def test_svm_absolute_edits_hit_the_targets_as_ridge_does_on_anisotropic_w():
    """The reviewer's case (demos/svm_calibration.py): with the slope regressed on w · n alone, svm edits missed
    the true scores by 0.195 on average (ridge: 0.010) and the slopes were up to 5 % off a · n."""
    torch.manual_seed(0)
    d, n = 16, 4000
    mixing = torch.eye(d) + torch.randn(d, d) / 4
    w = torch.randn(n, d) @ mixing
    truth, offsets = torch.randn(7, d), torch.randn(7)
    scores = w @ truth.T + offsets + 0.05 * torch.randn(n, 7)
    w0, targets = torch.randn(200, d) @ mixing, 2 * torch.randn(200, 3)
    errors = {}
    for method in ('ridge', 'svm'):
        for orthogonal in (False, True):
            directions = fit(w, scores, method=method, orthogonal=orthogonal)
            edited = directions.edit(w0, targets)
            torch.testing.assert_close(directions.predict(edited)[:, :3], targets.double(), atol=1e-6, rtol=0)
            if orthogonal:  # the held attributes' predictions stay where they were
                torch.testing.assert_close(directions.predict(edited)[:, 3:], directions.predict(w0)[:, 3:],
                                           atol=1e-6, rtol=0)
            true = edited.double() @ truth.T.double() + offsets.double()
            errors[method, orthogonal] = float((true[:, CONTROLLED] - targets).abs().mean())
            if method == 'svm':
                exact = torch.einsum('fd,fd->f', truth[CONTROLLED + HELD if orthogonal else CONTROLLED].double(),
                                     directions.normals[0])
                torch.testing.assert_close(directions.slopes[0], exact, rtol=0.005, atol=0)
                assert directions.fit_quality['eyes']['cos_gradient'] > 0.99
    assert max(errors.values()) <= 0.05, errors  # the noise of the scores
    assert errors['svm', False] <= 2 * errors['ridge', False] + 0.01, errors


def test_the_svm_normal_does_not_depend_on_where_w_is():
    """liblinear penalises the intercept: on uncentred w the normal tilted (cos 0.966 at |mean w| = 20,
    demos/svm_centering.py)."""
    from stylegan_modified.direction_fitting import fit_svm_normal
    rng = np.random.default_rng(0)
    n, d = 6000, 64
    a = rng.normal(size=d)
    a /= (a ** 2).sum() ** 0.5
    centred = 0.5 * rng.normal(size=(n, d))
    s = centred @ a + 0.05 * rng.normal(size=n)
    reference = fit_svm_normal(centred, s, 0.2, 1.0, 0)
    for offset in (6, 20):
        mu = rng.normal(size=d)
        mu *= offset / (mu ** 2).sum() ** 0.5
        normal = fit_svm_normal(centred + mu, s, 0.2, 1.0, 0)
        assert normal @ a > 0.997 and normal @ reference > 0.9999


def test_a_label_that_does_not_fit_the_base_generator_is_one_line(reference_dir, tmp_path, capsys):
    """A crafted directions file with a label on an 'original' base crashed stage 6 with a ValueError traceback
    from StyleGANW; the file is refused when read, and StyleGANW's own refusals are one line too."""
    import pandas as pd
    from script_runner import files_of, run_script
    from stylegan_modified.checkpoint import load_conditional_generator

    checkpoint = reference_dir / 'genforce' / 'tiny_ckpt.pth'
    record = {'kind': 'original', **file_identity(checkpoint), 'label': None, 'z_dim': 64, 'w_dim': 64,
              'num_layers': 14}
    raw = fit_directions(torch.randn(40, 64), torch.randn(40, 7), FitOptions(), generator=record,
                         layers=(0, 13)).to_dict()
    raw['generator'] = {**record, 'label': [0.0] * 7}
    torch.save(raw, tmp_path / 'crafted.pt')
    pd.DataFrame([[0.1] * 64], columns=[str(k) for k in range(64)]).to_csv(tmp_path / 'z.csv', index=False)
    root = tmp_path / 'root'
    root.mkdir()
    capsys.readouterr()
    assert run_script('run_fine_tuned_generator.py', '--model', 'directions', '--directions', tmp_path / 'crafted.pt',
                      '--weights', checkpoint, '--z-csv', tmp_path / 'z.csv', '--root', root, '--device', 'cpu',
                      '--no-progress', '--num', '1') == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert 'crafted.pt gives the unconditional base generator (original) a sampling label' in err
    assert files_of(root) == {}

    with pytest.raises(PipelineError, match='the unconditional generator takes no sampling label'):
        StyleGANW(load_generator(checkpoint), [0.0] * 7)
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    torch.save(tiny['state_dicts']['v1_generator'], tmp_path / 'v1.pth')
    v1 = load_conditional_generator(tmp_path / 'v1.pth', 'v1')
    for label in ([0.0] * 6, [float('inf')] * 7, 'abc'):
        with pytest.raises(PipelineError, match='sampling label'):
            StyleGANW(v1, label)


def test_small_edge_cases_of_the_fit():
    """The reviewer's demos/small_edges.py: a sample in both svm classes, a 2-sample training split, r = ±1 from
    2 held-out samples, and layers (0, 0) when fit_directions was called without them."""
    from stylegan_modified.direction_fitting import _top_bottom, minimum_training_samples, split_sizes
    bottom, top = _top_bottom(np.arange(7.0), 0.5)
    assert list(bottom) == [0, 1, 2] and list(top) == [4, 5, 6]
    bottom, top = _top_bottom(np.arange(8.0), 0.5)
    assert list(bottom) == [0, 1, 2, 3] and list(top) == [4, 5, 6, 7]

    for options in (FitOptions(), FitOptions(holdout=0.999), FitOptions(holdout=0.5),
                    FitOptions(method='svm', fraction=0.5, holdout=0.9), FitOptions(method='svm', groups=True)):
        n, needed = minimum_samples(options), minimum_training_samples(options)
        assert split_sizes(n, options.holdout)[0] >= needed and split_sizes(n, options.holdout)[1] >= 2
        assert n == max(4, int(np.ceil(2 / options.holdout)) + 2) or split_sizes(n - 1, options.holdout)[0] < needed
    assert minimum_samples(FitOptions()) == 22 and minimum_samples(FitOptions(method='svm', groups=True)) == 89
    assert minimum_samples(FitOptions(holdout=0.999)) == 7500  # 8 training samples left
    with pytest.raises(PipelineError, match=r'24 samples are too few for this fit \(--holdout 0.999 leaves 2 to fit '
                                            r'on, it needs 8\); --num must be at least 7500'):
        fit(torch.randn(24, DIM), torch.randn(24, 7), holdout=0.999)

    gen = torch.Generator().manual_seed(1)
    w, scores = torch.randn(22, DIM, generator=gen), torch.randn(22, 7, generator=gen)
    directions = fit(w, scores)  # 22 samples: 2 held out
    assert all(directions.fit_quality[a]['r'] is None and directions.fit_quality[a]['n_test'] == 2
               for a in directions.attributes)
    assert fit(torch.randn(40, DIM, generator=gen), torch.randn(40, 7, generator=gen)).fit_quality['eyes']['r'] \
        is not None

    unranged = fit_directions(w, scores, FitOptions(), generator=TOY_RECORD)
    assert unranged.layers is None  # all layers, resolved against the generator it is applied to
    assert DirectionsControl(LinearToy(DIM, LAYERS), unranged).layers == (0, LAYERS - 1)
    assert AttributeDirections.from_dict(unranged.to_dict()).layers is None


class TextureImages:
    """Fine stripes whose frequencies follow z and the label: JPEG moves their pixels (flat blocks it would not)."""
    name, z_dim, score_algorithm, trained_attributes = 'texture', 4, 2, PROPERTY_NAMES
    device = torch.device('cpu')

    def images(self, z, values):
        axis = torch.linspace(0, 60, 256)
        a = 1 + z[:, :1].float().abs() + values[:, :1].float()
        b = 1 + z[:, 1:2].float().abs()
        phase = a[:, :, None, None] * axis[None, None, :, None] + b[:, :, None, None] * axis[None, None, None, :]
        return torch.cat([torch.sin(phase), torch.cos(phase), torch.sin(0.5 * phase)], dim=1) * 0.9


def test_the_sampler_scores_the_pixels_the_evaluation_measures(tmp_path):
    """The sampler fed the raw float images to the CNN, the evaluation the uint8 + JPEG pixels: absolute targets
    fitted on one and measured on the other differed by the format alone."""
    import pandas as pd
    from ohlora.layout import AttributeControlFolder
    from stylegan.postprocess import to_uint8, to_uint8_tensor
    from stylegan_modified.attribute_measurers import PropertyCNNMeasurer
    from stylegan_modified.attribute_metrics import grid_labels
    from stylegan_modified.direction_sampling import PropertyCNNScorer
    from stylegan_modified.evaluation_inputs import seeded_z
    from stylegan_modified.evaluation_run import MEASURED_COLUMNS, EvaluationInputs, evaluate

    raw = torch.randn(3, 3, 8, 8, dtype=torch.float64) * 1.2
    raw[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, -1.0 + 1 / 255, 2 * (100.5 / 255) - 1])  # exact halves, the ends
    assert np.array_equal(to_uint8_tensor(raw).numpy(), to_uint8(raw))

    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(16, 7))
    generator, grid = TextureImages(), {'eyes': (-1.0, 0.5, 1.0)}
    inputs = EvaluationInputs(generator, PropertyCNNMeasurer(cnn, None), seeded_z(0, 1, 4), grid, z_source='seed 0')
    folder = AttributeControlFolder(tmp_path / 'run')
    evaluate(inputs, folder, batch_size=3, progress=False)
    measured = pd.read_csv(folder.z_scores(0))[MEASURED_COLUMNS].to_numpy()
    images = generator.images(torch.from_numpy(inputs.z).expand(3, -1), torch.from_numpy(grid_labels(grid)))
    sampled = PropertyCNNScorer(cnn)(images).double().numpy()
    np.testing.assert_allclose(np.round(sampled, 4), measured, atol=1e-4, rtol=0)
    with torch.no_grad():
        assert np.abs(cnn(images).double().numpy() - measured).max() > 1e-3  # raw pixels would have been off
    with pytest.raises(PipelineError, match='the base generator gave NaN or infinite pixels'):
        PropertyCNNScorer(cnn)(images * float('nan'))


def test_saved_sample_images_are_written_by_the_batch_writer(tmp_path, monkeypatch):
    import stylegan_modified.direction_sampling as sampling
    from ohlora.image_writer import BatchImageWriter

    batches = []

    class Recording(BatchImageWriter):
        def submit(self, images):
            images = list(images)
            batches.append([path.name for path, _ in images])
            super().submit(images)

    monkeypatch.setattr(sampling, 'BatchImageWriter', Recording)

    class Pixels(LinearToy):  # images a JPEG can hold: [N, 3, 8, 8]
        def images(self, wp):
            pixels = torch.tanh(wp.mean(dim=1)[:, :12].reshape(-1, 3, 2, 2))
            return pixels.repeat_interleave(4, 2).repeat_interleave(4, 3)

    files = DirectionSamplesFolder(tmp_path)
    sample_w_and_scores(Pixels(DIM, LAYERS), lambda images: torch.zeros(len(images), 7), files,
                        settings(chunk_size=5), 7, 2, save_images=True, progress=False)
    # one submit per batch (batches start at chunk boundaries), every image on disk once the run returns
    assert batches == [['000000.jpg', '000001.jpg'], ['000002.jpg', '000003.jpg'], ['000004.jpg'],
                       ['000005.jpg', '000006.jpg']]
    assert sorted(p.name for p in files.images_dir.iterdir()) == [f'{n:06d}.jpg' for n in range(7)]
