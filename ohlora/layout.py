"""The on-disk layout of every stage: the only module that spells folder and file names.

Stage outputs live under a *root* (``--root``, default: the repository root, like the upstream
``PROJECT_DIR_PATH``). Data that ships with the code (the hand labels, the test z vectors) resolves
relative to the code, unless a file of the same name exists under the root, which then takes precedence.
The upstream file names are kept so that upstream or published artefacts can be dropped in at any stage.

Everything that names a file goes through here: :class:`Layout` paths, the name functions and patterns below
(folder scans match them), and the published file names that :mod:`ohlora.weights` builds its sources from.
Messages build their file names from these too, e.g. ``name_form(image_name(0))`` -> ``NNNNNN.jpg``.
``tests/test_layout_ownership.py`` fails when code elsewhere spells a stage file or folder name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# The shared constants live in ohlora.constants; these four are importable from here too for code written
# before they moved (import them from ohlora.constants).
from ohlora.constants import CNN_PROPERTIES, NUM_FOLDS, PROPERTY_NAMES, SCORE_COLUMNS  # noqa: F401

CODE_ROOT = Path(__file__).resolve().parents[1]

HAND_LABELS_CSV = 'cnn/synthesize_results_quality_and_gender.csv'
TEST_Z_CSV = 'stylegan_modified/test_z_vector_0005.csv'

# --- numbered image files -----------------------------------------------------------------------------------
IMAGE_NUMBER_DIGITS = 6
MAX_IMAGES = 10 ** IMAGE_NUMBER_DIGITS  # image numbers 0..999999 have the six digits every name and scan expects
IMAGE_SUFFIX = '.jpg'                   # generated images (stages 1, 6, the directions tool) are JPEGs
INPUT_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')  # what stage 3 accepts as NNNNNN.<suffix> input images
PUBLISHED_IMAGES_GLOB = '*' + IMAGE_SUFFIX        # the files of the published image datasets
_NUMBER = r'(\d{6})'


def image_name(img_no: int) -> str:
    return f'{img_no:06d}{IMAGE_SUFFIX}'


IMAGE_PATTERN = re.compile(_NUMBER + re.escape(IMAGE_SUFFIX))  # group 1: the image number


def parse_img_no(name: str) -> int | None:
    """``'000123.jpg'`` or ``'parsing_000123.png'`` -> 123; None for a name that is not one of ours."""
    stem = Path(name).stem
    digits = stem.rsplit('_', 1)[-1]
    return int(digits) if len(digits) == 6 and digits.isdigit() else None


def is_input_image(path: Path) -> bool:
    """An ``NNNNNN.jpg`` (or .jpeg/.png, any case) file name, as stage 3 reads them."""
    img_no = parse_img_no(path.name)
    return img_no is not None and path.suffix.lower() in INPUT_IMAGE_SUFFIXES and path.stem == f'{img_no:06d}'


def name_form(name: str) -> str:
    """A numbered file name as messages show its kind: ``'parsing_000000.png'`` -> ``'parsing_NNNNNN.png'``."""
    return re.sub(r'\d{6}', 'N' * IMAGE_NUMBER_DIGITS, name, count=1)


# --- stage 3 result names (in Layout.segmentation_dir) -----------------------------------------------------
SEGMENTATION_SUFFIX = '.png'
PLOT_SUFFIX = '.png'  # sweep grids, monitoring snapshots and evaluation plots


def parsing_map_name(img_no: int) -> str:
    return f'parsing_{img_no:06d}{SEGMENTATION_SUFFIX}'


def parsing_visualization_name(img_no: int) -> str:
    return f'parsing_visualization_{img_no:06d}{SEGMENTATION_SUFFIX}'


def face_crop_name(img_no: int) -> str:
    return f'face_{img_no:06d}{SEGMENTATION_SUFFIX}'


# The three result files of an image (group 1: its number), and the glob of the parsing maps alone.
SEGMENTATION_OUTPUT_PATTERN = re.compile(r'(?:parsing|parsing_visualization|face)_' + _NUMBER
                                         + re.escape(SEGMENTATION_SUFFIX))
PARSING_MAP_GLOB = 'parsing_*' + SEGMENTATION_SUFFIX


# --- published weights (ohlora.weights builds its sources from these) --------------------------------------
GENFORCE_ZOO_FILE = 'stylegan_celeba_partial256.pth'  # GenForce's model-zoo name of the stage-1 generator
FACEXFORMER_HUB_FILE = 'ckpts/model.pt'                # the FaceXFormer checkpoint inside its Hugging Face repo
# Oh-LoRA's published stage-5 files (in Layout.fine_tuned_dir), by variant; a training run writes its
# checkpoints under the same names.
GENERATOR_FILES = {'v1': 'stylegan_gen_fine_tuned_v1.pth', 'v2': 'stylegan_gen_fine_tuned_v2.pth',
                   'v3': 'stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth', 'v4': 'stylegan_gen_fine_tuned_v4.pth'}
DISCRIMINATOR_FILES = {'v1': 'stylegan_dis_fine_tuned_v1.pth', 'v4': 'stylegan_dis_fine_tuned_v4.pth'}
PROPERTY_CNN_FILE = 'stylegan_gen_fine_tuned_v2_cnn.pth'  # the v2 property-score CNN
IDENTITY_WEIGHTS_FILE = '20180402-114759-vggface2.pt'      # facenet-pytorch's InceptionResnetV1 (VGGFace2)


def cnn_model_name(prop: str, fold: int) -> str:
    """A stage-2 fold model, e.g. ``gender_model_0.pt`` (also its name in the published CNN repository)."""
    return f'{prop}_model_{fold}.pt'


# --- sharded runs (--shard i/n, torchrun): per-shard records, merged into the files one process writes ---
SHARD_RECORDS_FOLDER = 'shard_records'


class ShardRecordsFolder:
    """The records of the shards of one sharded run of a stage: ``shard_I_of_N.json`` per shard (what it ran with,
    how far it got) and its data files ``shard_I_of_N_<part>.csv``; the merge step turns them into the stage's own
    files and removes the folder."""

    PATTERN = re.compile(r'shard_(\d+)_of_(\d+)\.json')

    def __init__(self, folder: Path):
        self.folder = folder

    def record(self, index: int, count: int) -> Path:
        return self.folder / f'shard_{index}_of_{count}.json'

    def data(self, index: int, count: int, part: str) -> Path:
        return self.folder / f'shard_{index}_of_{count}_{part}.csv'

    def records(self) -> list[tuple[int, int, Path]]:
        """(index, count, path) of every shard record in the folder, by count then index."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = self.PATTERN.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), int(match.group(2)), path))
        return sorted(found, key=lambda item: (item[1], item[0]))


class Layout:
    """Every path of the pipeline, relative to ``root``."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else CODE_ROOT

    def shipped(self, relative: str) -> Path:
        """A data file shipped with the code; a file of the same name under the root takes precedence."""
        under_root = self.root / relative
        return under_root if under_root.exists() else CODE_ROOT / relative

    def relative(self, path: Path) -> str:
        """POSIX path relative to the root, as written into CSVs (never absolute, R4); the bare name outside it."""
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return Path(path).name

    def path_from_root(self, path: Path) -> str:
        """POSIX path relative to the root that finds ``path`` again, with ``..`` steps when it lies outside the
        root (never absolute, R4); for records that later stages resolve with :meth:`resolve_from_root`."""
        path, root = Path(path).resolve(), self.root.resolve()
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            try:
                return Path(os.path.relpath(path, root)).as_posix()
            except ValueError:  # another drive (Windows): no relative path exists
                return path.as_posix()

    def resolve_from_root(self, text: str) -> Path:
        return self.root / text

    # --- weights ---
    @staticmethod
    def download_record(weights: Path) -> Path:
        """Size and SHA-256 of a downloaded weights file, recorded beside it by the download (JSON)."""
        weights = Path(weights)
        return weights.with_name(weights.name + '.download.json')

    # --- stage 1: sampling ---
    @property
    def original_generator_weights(self) -> Path:
        return self.root / 'stylegan' / 'stylegan_model.pth'

    @property
    def synthesized_dir(self) -> Path:
        return self.root / 'stylegan' / 'synthesize_results'

    @property
    def synthesized_z_csv(self) -> Path:
        return self.root / 'stylegan' / 'synthesize_results_z.csv'

    @property
    def synthesized_meta(self) -> Path:
        return self.root / 'stylegan' / 'synthesize_results_meta.json'

    def synthesized_image(self, img_no: int) -> Path:
        return self.synthesized_dir / image_name(img_no)

    # --- stage 2: gender / quality CNNs and the filter ---
    @property
    def hand_labels_csv(self) -> Path:
        return self.shipped(HAND_LABELS_CSV)

    @property
    def cnn_models_dir(self) -> Path:
        return self.root / 'cnn' / 'models'

    def cnn_model(self, prop: str, fold: int) -> Path:
        return self.cnn_models_dir / cnn_model_name(prop, fold)

    @property
    def cnn_log_dir(self) -> Path:
        return self.root / 'cnn' / 'log'

    def cnn_epoch_log(self, prop: str, fold: int) -> Path:
        return self.cnn_log_dir / f'epoch_detail_{prop}_{fold}.csv'

    def cnn_train_log(self, prop: str) -> Path:
        return self.cnn_log_dir / f'train_log_{prop}.csv'

    def cnn_staged_model(self, prop: str, fold: int) -> Path:
        """A fold model of an unfinished --retrain; moved to cnn_model() once every fold has succeeded."""
        return self.root / 'cnn' / 'models_in_training' / cnn_model_name(prop, fold)

    def cnn_record(self, name: str) -> Path:
        """Settings of a retrain or scoring run, so that a rerun resumes or skips it (JSON)."""
        return self.root / 'cnn' / 'records' / f'{name}.json'

    @property
    def cnn_scoring_record(self) -> Path:
        """Settings and input digests of the ensemble scoring (cnn/scoring.py)."""
        return self.cnn_record('scoring')

    def cnn_retrain_record(self, prop: str) -> Path:
        """Settings and finished folds of a --retrain of one property (cnn/training.py)."""
        return self.cnn_record(f'retrain_{prop}')

    def cnn_inference_csv(self, prop: str) -> Path:
        return self.root / 'cnn' / 'inference_result' / f'{prop}.csv'

    def cnn_partial_scores(self, prop: str) -> Path:
        """Rows of an unfinished scoring run; cnn_inference_csv() is written only once every image is scored."""
        return self.cnn_record(f'scoring_{prop}').with_suffix('.partial.csv')

    @property
    def cnn_merged_csv(self) -> Path:
        return self.root / 'cnn' / 'all_image_quality_and_gender.csv'

    @property
    def filtered_dir(self) -> Path:
        return self.root / 'stylegan' / 'synthesize_results_filtered'

    def filtered_image(self, img_no: int) -> Path:
        return self.filtered_dir / image_name(img_no)

    # --- stage 3: face detection and parsing ---
    @property
    def segmentation_models_dir(self) -> Path:
        return self.root / 'segmentation' / 'models'

    @property
    def facexformer_weights(self) -> Path:
        return self.segmentation_models_dir / 'segmentation_model.pt'

    @property
    def segmentation_dir(self) -> Path:
        return self.root / 'segmentation' / 'segmentation_results'

    def parsing_map(self, img_no: int) -> Path:
        return self.segmentation_dir / parsing_map_name(img_no)

    def parsing_visualization(self, img_no: int) -> Path:
        return self.segmentation_dir / parsing_visualization_name(img_no)

    def face_crop(self, img_no: int) -> Path:
        return self.segmentation_dir / face_crop_name(img_no)

    @property
    def segmentation_skipped_csv(self) -> Path:
        return self.segmentation_dir / 'skipped.csv'

    @property
    def segmentation_meta(self) -> Path:
        return self.segmentation_dir / 'segmentation_meta.json'

    # --- sharded runs of stages 1, 2 and 3 (stage 6 and the directions keep theirs in their output folder) ---
    def shard_records(self, stage: str) -> ShardRecordsFolder:
        """The shard records of a sharded run of stage ``stage`` ('1', '2', '3') under the root."""
        return ShardRecordsFolder(self.shard_records_root / f'stage{stage}')

    @property
    def shard_records_root(self) -> Path:
        return self.root / SHARD_RECORDS_FOLDER

    # --- stage 4: property scores ---
    @property
    def property_scores_dir(self) -> Path:
        return self.root / 'segmentation' / 'property_score_results'

    def property_scores_csv(self, algorithm: int) -> Path:
        return self.property_scores_dir / ('all_scores.csv' if algorithm == 1 else 'all_scores_v2.csv')

    def property_scores_raw_csv(self, algorithm: int) -> Path:
        return self.property_scores_dir / ('all_scores_raw.csv' if algorithm == 1 else 'all_scores_v2_raw.csv')

    def property_scores_stats(self, algorithm: int) -> Path:
        return self.property_scores_dir / ('all_scores_stats.json' if algorithm == 1 else 'all_scores_v2_stats.json')

    @property
    def property_cnn_scores_csv(self) -> Path:
        return self.property_scores_dir / 'all_scores_v2_cnn.csv'

    @property
    def property_cnn_compare_csv(self) -> Path:
        return self.property_scores_dir / 'compare' / 'all_scores_v2_vs_cnn.csv'

    # --- stages 5 and 6: fine-tuned generators ---
    @property
    def fine_tuned_dir(self) -> Path:
        return self.root / 'stylegan_modified'

    # --- stage 5: training runs (v1 here; v2, v3 add their log names to TRAIN_LOG_NAMES) ---
    def training_run(self, version: str, outdir: str | Path | None = None) -> 'TrainingRunFolder':
        """The files of a stage-5 training run: checkpoints under their published names in ``outdir`` (default
        fine_tuned_dir, where v2, v3 and stage 6 look for them), the run's own files in a sub-folder."""
        return TrainingRunFolder(Path(outdir) if outdir is not None else self.fine_tuned_dir, version)

    def fine_tuned(self, file_name: str) -> Path:
        """A checkpoint or log of stage 5 by its upstream file name, e.g. ``stylegan_gen_fine_tuned_v1.pth``."""
        return self.fine_tuned_dir / file_name

    # --- stage 5 v2: the property CNN's scoring pass (all_scores_v2_cnn.csv and its comparison CSV) ---
    @property
    def property_cnn_scoring_dir(self) -> Path:
        """What the scoring pass used (``scoring_record.json``: up-to-date check) and wrote (``written_files.json``:
        the no-overwrite rule for the two CSVs)."""
        return self.property_scores_dir / 'property_cnn_scoring'

    @property
    def property_cnn_scoring_record(self) -> Path:
        return self.property_cnn_scoring_dir / 'scoring_record.json'

    @property
    def property_cnn_scoring_written(self) -> Path:
        return self.property_cnn_scoring_dir / 'written_files.json'

    @property
    def test_z_csv(self) -> Path:
        return self.shipped(TEST_Z_CSV)

    # --- stage 5: attribute directions in w (find_attribute_directions.py) ---
    @property
    def attribute_directions(self) -> Path:
        """The default directions file: fitted directions, calibration and the identity of what they fit."""
        return self.fine_tuned_dir / 'attribute_directions.pt'

    @staticmethod
    def directions_report(directions_file: str | Path) -> Path:
        """The fit-quality report (JSON) written beside a directions file."""
        path = Path(directions_file)
        return path.with_name(f'{path.stem}_fit_quality.json')

    @property
    def direction_samples_dir(self) -> Path:
        """Sampled w and property-CNN scores of the directions fit, in resumable chunks."""
        return self.fine_tuned_dir / 'attribute_direction_samples'

    def direction_samples(self, folder: str | Path | None = None) -> 'DirectionSamplesFolder':
        return DirectionSamplesFolder(Path(folder) if folder is not None else self.direction_samples_dir)

    def final_inference_dir(self, model: str) -> Path:
        return self.fine_tuned_dir / f'final_inference_test_{model}'

    def generation_folder(self, model: str, outdir: str | Path | None = None,
                          sweep: str | None = None) -> 'GenerationFolder':
        """The files of a stage-6 run: in ``outdir`` (default final_inference_dir), a sweep in its own sub-folder."""
        return GenerationFolder(Path(outdir) if outdir is not None else self.final_inference_dir(model), sweep)

    # --- evaluation: what a generator really controls (evaluate_attribute_control.py) ---
    @property
    def evaluation_dir(self) -> Path:
        return self.root / 'evaluation'

    @property
    def identity_weights(self) -> Path:
        """facenet-pytorch's InceptionResnetV1 VGGFace2 weights (the identity embedding of the evaluation)."""
        return self.evaluation_dir / 'models' / IDENTITY_WEIGHTS_FILE

    def attribute_control_dir(self, model: str, measure: str) -> Path:
        return self.evaluation_dir / 'attribute_control' / f'{model}_{measure}'

    def attribute_control_folder(self, model: str, measure: str,
                                 outdir: str | Path | None = None) -> 'AttributeControlFolder':
        """The files of one evaluation run: in ``outdir`` (default attribute_control_dir(model, measure))."""
        folder = Path(outdir) if outdir is not None else self.attribute_control_dir(model, measure)
        return AttributeControlFolder(folder)


# The upstream log name of each trainer (PIPELINE.md §1); the project keeps it inside the run folder.
TRAIN_LOG_NAMES = {'v1': 'train_log.csv', 'v2_cnn': 'train_log_v2_cnn.csv', 'v2': 'train_log_v2.csv',
                   'v3': 'train_log_v3.csv'}
# A trainer's second log: v2's property CNN logs the first validation outputs and labels of every epoch.
VALIDATION_LOG_NAMES = {'v2_cnn': 'train_log_v2_cnn_val_log.csv'}
# The generator v2 trains through the property CNN (PROPERTY_CNN_FILE holds the CNN's best epoch).
V2_GENERATOR_FILE = GENERATOR_FILES['v2']


class TrainingRunFolder:
    """Stage-5 run files. Checkpoints (published names) in ``outdir``; in ``outdir/fine_tuning_<version>/``:
    ``training_options.json`` (the resolved options), the train log, ``resume_record.pt`` (what ``--resume``
    continues from), ``written_files.json`` (what this run wrote where, for the no-overwrite rule) and the
    monitoring snapshots ``snapshots/epoch_EEEE_idx_IIII.png``."""

    def __init__(self, outdir: Path, version: str):
        self.outdir = outdir
        self.version = version
        self.folder = outdir / f'fine_tuning_{version}'

    def checkpoint(self, file_name: str) -> Path:
        """A published-name checkpoint of this run, e.g. ``stylegan_gen_fine_tuned_v1.pth``."""
        return self.outdir / file_name

    @property
    def options_json(self) -> Path:
        return self.folder / 'training_options.json'

    @property
    def train_log(self) -> Path:
        return self.folder / TRAIN_LOG_NAMES.get(self.version, f'train_log_{self.version}.csv')

    @property
    def validation_log(self) -> Path:
        """The second log of a trainer that has one (VALIDATION_LOG_NAMES)."""
        return self.folder / VALIDATION_LOG_NAMES.get(self.version, f'train_log_{self.version}_val_log.csv')

    @property
    def resume_record(self) -> Path:
        return self.folder / 'resume_record.pt'

    @property
    def written_files(self) -> Path:
        return self.folder / 'written_files.json'

    @property
    def snapshots_dir(self) -> Path:
        return self.folder / 'snapshots'

    def snapshot(self, epoch: int, idx: int) -> Path:
        return self.snapshots_dir / f'epoch_{epoch:04d}_idx_{idx:04d}.png'


class GenerationFolder:
    """Stage-6 output: ``NNNNNN.jpg`` images, or for a sweep of one attribute a sub-folder ``sweep_<attr>/`` with
    ``NNNNNN_<attr>_<value>.jpg`` and the grid ``sweep_<attr>.png``; each folder records its settings and z."""

    def __init__(self, outdir: Path, sweep: str | None = None):
        self.sweep = sweep
        self.folder = outdir / f'sweep_{sweep}' if sweep else outdir

    @property
    def settings_json(self) -> Path:
        return self.folder / 'generation_settings.json'

    @property
    def z_csv(self) -> Path:
        return self.folder / 'z_vectors.csv'

    @property
    def grid(self) -> Path:
        return self.folder / f'sweep_{self.sweep}.png'

    def image_name(self, img_no: int, value: float | None = None) -> str:
        if self.sweep is None:
            return image_name(img_no)
        return f'{img_no:06d}_{self.sweep}_{float(value)!r}{IMAGE_SUFFIX}'

    def image_pattern(self) -> re.Pattern:
        """The names of this folder's images (group 1: the z number), as a folder scan matches them."""
        if self.sweep is None:
            return IMAGE_PATTERN
        return re.compile(_NUMBER + f'_{re.escape(self.sweep)}_.+' + re.escape(IMAGE_SUFFIX))

    def image(self, img_no: int, value: float | None = None) -> Path:
        return self.folder / self.image_name(img_no, value)

    @property
    def shard_records(self) -> ShardRecordsFolder:
        return ShardRecordsFolder(self.folder / SHARD_RECORDS_FOLDER)


class DirectionSamplesFolder:
    """Sampling output of the directions fit: ``samples_settings.json`` (what every chunk was made with),
    ``chunk_KKKKKK.pt`` (w and the 7 scores of images K*C .. K*C+C-1) and, with --save-images, ``images/NNNNNN.jpg``."""

    CHUNK_PREFIX = 'chunk_'

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def settings_json(self) -> Path:
        return self.folder / 'samples_settings.json'

    def chunk(self, index: int) -> Path:
        return self.folder / f'{self.CHUNK_PREFIX}{index:06d}.pt'

    def chunk_files(self) -> list[Path]:
        return sorted(self.folder.glob(f'{self.CHUNK_PREFIX}[0-9][0-9][0-9][0-9][0-9][0-9].pt')) \
            if self.folder.is_dir() else []

    @property
    def images_dir(self) -> Path:
        return self.folder / 'images'

    def image(self, index: int) -> Path:
        return self.images_dir / image_name(index)

    @property
    def shard_records(self) -> ShardRecordsFolder:
        return ShardRecordsFolder(self.folder / SHARD_RECORDS_FOLDER)


class AttributeControlFolder:
    """One evaluation run: the settings record, the z used, per z its rendered images (``images/zNNNNNN/``), its
    measurements (``scores/zNNNNNN.csv``, written once the z is complete) and its sweep grid; then the figures."""

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def settings_json(self) -> Path:
        return self.folder / 'evaluation_settings.json'

    @property
    def z_csv(self) -> Path:
        return self.folder / 'z_vectors.csv'

    def image_dir(self, z_index: int) -> Path:
        return self.folder / 'images' / f'z{z_index:06d}'

    def image(self, z_index: int, label_index: int) -> Path:
        return self.image_dir(z_index) / f'{label_index:06d}.jpg'

    @property
    def scores_dir(self) -> Path:
        return self.folder / 'scores'

    def z_scores(self, z_index: int) -> Path:
        return self.scores_dir / f'z{z_index:06d}.csv'

    def sweep_grid(self, z_index: int) -> Path:
        return self.folder / 'sweep_grids' / f'z{z_index:06d}{PLOT_SUFFIX}'

    @property
    def per_image_csv(self) -> Path:
        return self.folder / 'per_image.csv'

    @property
    def per_z_csv(self) -> Path:
        return self.folder / 'per_z.csv'

    @property
    def summary_json(self) -> Path:
        return self.folder / 'summary.json'

    @property
    def summary_md(self) -> Path:
        return self.folder / 'summary.md'

    def plot(self, name: str) -> Path:
        """``r_mae``, ``r_distribution``, ``leakage``."""
        return self.folder / 'plots' / f'{name}{PLOT_SUFFIX}'


# --- stage 5 v3: per-epoch checkpoints, test z vectors and per-epoch test folders (PIPELINE.md §7.4) ---
# Data files that ship beside the code: a run never writes them, whatever its options (--overwrite included).
SHIPPED_FILES = (HAND_LABELS_CSV, TEST_Z_CSV, 'stylegan_modified/test_z_vector_0007.csv')


def shipped_with_code(path: str | Path) -> bool:
    """Whether ``path`` is one of the data files shipped beside the code (:data:`SHIPPED_FILES` under CODE_ROOT)."""
    resolved = Path(path).resolve()
    return any(resolved == (CODE_ROOT / relative).resolve() for relative in SHIPPED_FILES)


class V3Outputs:
    """What a v3 run writes under its published names in ``files.outdir`` (the final generator and encoder, the
    checkpoints and best z of each passing epoch), and its per-epoch test folders inside the run folder."""

    FINAL_GENERATOR = 'stylegan_gen_fine_tuned_v3.pth'
    FINAL_ENCODER = 'stylegan_gen_fine_tuned_v3_encoder.pth'
    TEST_FOLDER = 'inference_test_during_finetuning_v3'

    def __init__(self, files: TrainingRunFolder):
        self.files = files

    @property
    def final_generator(self) -> Path:
        return self.files.checkpoint(self.FINAL_GENERATOR)

    @property
    def final_encoder(self) -> Path:
        return self.files.checkpoint(self.FINAL_ENCODER)

    def epoch_checkpoint(self, epoch: int, part: str) -> Path:
        """``stylegan_gen_fine_tuned_v3_ckpt_EEEE_{gen,enc}.pth`` (part 'gen' or 'enc')."""
        return self.files.checkpoint(f'stylegan_gen_fine_tuned_v3_ckpt_{epoch:04d}_{part}.pth')

    def test_z_csv(self, epoch: int) -> Path:
        """``test_z_vector_EEEE.csv``: the best passing z of an epoch, in the one-row format stage 6 reads."""
        return self.files.checkpoint(f'test_z_vector_{epoch:04d}.csv')

    def epoch_files(self, epoch: int) -> tuple[Path, Path, Path]:
        """The published-name files a passing ``epoch`` writes."""
        return self.epoch_checkpoint(epoch, 'gen'), self.epoch_checkpoint(epoch, 'enc'), self.test_z_csv(epoch)

    def epoch_test(self, epoch: int) -> 'V3EpochTestFolder':
        return V3EpochTestFolder(self.files.folder / self.TEST_FOLDER / f'epoch_{epoch:04d}')


class V3EpochTestFolder:
    """``inference_test_during_finetuning_v3/epoch_EEEE/``: the stored mu / log-variance rows, the test z's, per z
    a folder ``z_KKK/`` with its images ``NNN.jpg`` and ``test_result.csv``, ``result_each_z.csv``, and the
    random images ``random/NNN.jpg`` with ``random/test_result.csv``."""

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def mus_csv(self) -> Path:
        return self.folder / 'test_mus.csv'

    @property
    def log_vars_csv(self) -> Path:
        return self.folder / 'test_log_vars.csv'

    @property
    def zs_csv(self) -> Path:
        return self.folder / 'test_zs.csv'

    @property
    def result_each_z_csv(self) -> Path:
        return self.folder / 'result_each_z.csv'

    def z_dir(self, z_index: int) -> Path:
        return self.folder / f'z_{z_index:03d}'

    def z_image(self, z_index: int, label_index: int) -> Path:
        return self.z_dir(z_index) / f'{label_index:03d}.jpg'

    def z_result_csv(self, z_index: int) -> Path:
        return self.z_dir(z_index) / 'test_result.csv'

    @property
    def random_dir(self) -> Path:
        return self.folder / 'random'

    def random_image(self, index: int) -> Path:
        return self.random_dir / f'{index:03d}.jpg'

    @property
    def random_result_csv(self) -> Path:
        return self.random_dir / 'test_result.csv'
