"""Stage 5 v2 (PIPELINE.md §7.3): the property-score CNN, its scores of every image, and optionally the generator
trained through it. One call of :func:`fine_tune_v2` runs the phases in order:

1. **CNN** (:mod:`stylegan_modified.property_cnn_training`): trained on the algorithm-2 scores, best epoch
   written as ``stylegan_gen_fine_tuned_v2_cnn.pth``. Skipped when ``property_cnn_path`` names a CNN file
   (e.g. the published one): then only the CSVs are written (and the generator trained, if asked).
2. **Scores** (:mod:`stylegan_modified.property_cnn_scoring`): ``all_scores_v2_cnn.csv`` and
   ``compare/all_scores_v2_vs_cnn.csv`` from the CNN of phase 1 (its best epoch) or the given file.
3. **Generator** (:mod:`stylegan_modified.v2_generator_training`), only with ``generator`` settings (the
   script's ``--train-generator``): the v1 G trained through the CNN, upstream's failed variant.

Everything a user can get wrong is checked before anything is written: the options, the scores CSV, every
image, the given CNN or v1 file, both run folders and every output under the no-overwrite rule. A phase that is
already complete is skipped (a finished run, CSVs made from the same CNN and scores), so a rerun with the same
options writes nothing. ``resume`` continues the interrupted phase exactly (the CNN run; the generator run if it
has started); a stop signal ends the call after a complete checkpoint (status 'interrupted').

Several processes (torchrun): the two training phases run on every rank in DDP (see their modules); the scoring
pass runs on rank 0 alone while the others wait (its ``scoring`` is None on them).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ohlora.distributed import DistContext
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.records import sha256_of
from ohlora.resume import RESUMABLE_OPTIONS
from ohlora.weights import SOURCES, fetch
from stylegan_modified.checkpoint import load_conditional_generator, load_property_cnn
from stylegan_modified.datasets import ScoredImageDataset
from stylegan_modified.ddp import main_first, training_context
from stylegan_modified.property_cnn_scoring import ScoringPass, ScoringResult
from stylegan_modified.property_cnn_training import BEST, CnnResult, PropertyCnnSettings, PropertyCnnTraining
from stylegan_modified.property_score_cnn import IMAGE_SIZE, PropertyScoreCNN
from stylegan_modified.training_run import cpu_state_dict
from stylegan_modified.v2_generator_training import GeneratorResult, V2GeneratorSettings, V2GeneratorTraining

CNN_SOURCE, V1_SOURCE = 'v2_property_cnn', 'v1_generator'  # ohlora.weights.SOURCES keys


@dataclass
class V2Result:
    cnn: CnnResult | None               # None when the CNN came from a file
    cnn_file: Path | None               # the file the scores and the generator used
    scoring: ScoringResult | None       # None when the CNN phase was interrupted
    generator: GeneratorResult | None   # None without generator settings (or when an earlier phase stopped)

    @property
    def interrupted(self) -> str | None:
        """The signal that stopped a phase, or None."""
        for phase in (self.cnn, self.generator):
            if phase is not None and phase.status == 'interrupted':
                return phase.signal
        return None


def state_sha256(state: dict) -> str:
    """SHA-256 of ``torch.save(state)``: that of the file a checkpoint writes from this state."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def _given_file(path: str | Path, option: str, source: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f'{option} {path}: no such file (expected the {SOURCES[source].description})')
    return path


def fine_tune_v2(layout: Layout, cnn_settings: PropertyCnnSettings,
                 generator_settings: V2GeneratorSettings | None = None, *, scores_path: str | Path | None = None,
                 property_cnn_path: str | Path | None = None, v1_weights_path: str | Path | None = None,
                 outdir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
                 ctx: DistContext | None = None) -> V2Result:
    """Run the v2 phases (module docstring); returns what each did. ``ctx``: this process among those of a
    torchrun (default: from the environment; one process without it)."""
    cnn_settings = replace(cnn_settings, scores=None if scores_path is None else layout.relative(Path(scores_path)))
    ctx = ctx if ctx is not None else training_context(torch.device(cnn_settings.device))
    cnn_settings.check(ctx.world_size)
    device = ctx.device
    if generator_settings is not None:
        generator_settings = replace(generator_settings, v1_weights=None if v1_weights_path is None
                                     else layout.relative(Path(v1_weights_path)))
        generator_settings.check(ctx.world_size)
    if resume and property_cnn_path is not None and generator_settings is None:
        raise PipelineError('--resume continues a training run, but with --property-cnn and without '
                            '--train-generator nothing is trained')

    # --- checks; nothing is written until every one has passed ---
    given_cnn: PropertyScoreCNN | None = None
    if property_cnn_path is not None:
        cnn_file = _given_file(property_cnn_path, '--property-cnn', CNN_SOURCE)
        given_cnn = load_property_cnn(cnn_file)
        cnn_sha256 = sha256_of(cnn_file)
    scores_csv = Path(scores_path) if scores_path is not None else layout.property_scores_csv(2)
    what = f'algorithm-2 property scores CSV ({layout.property_scores_csv(2).name})'
    dataset = ScoredImageDataset.filtered(layout, scores_csv, image_size=(IMAGE_SIZE, IMAGE_SIZE), what=what)

    cnn_phase = cnn_plan = None
    if given_cnn is None:
        cnn_phase = PropertyCnnTraining(layout, cnn_settings, dataset, outdir, ctx)
        cnn_plan = cnn_phase.plan(resume=resume, overwrite=overwrite)
        cnn_file = cnn_phase.output
    # where the scores' CNN comes from (recorded with the CSVs) and, when already known, its SHA-256
    cnn_source = {'file': layout.path_from_root(cnn_file),
                  'run': None if cnn_phase is None else layout.path_from_root(cnn_phase.files.folder)}
    finished_sha256 = (state_sha256(cnn_plan.record.models[BEST]) if cnn_plan is not None and cnn_plan.finished
                       else cnn_sha256 if given_cnn is not None else None)
    scoring = ScoringPass(layout, dataset, device=device, batch_size=cnn_settings.eval_batch_size,
                          workers=cnn_settings.workers, compat=cnn_settings.compat, seed=cnn_settings.seed,
                          progress=not cnn_settings.no_progress and ctx.is_main)

    v1_state = v1_file = None
    generator_resume = needs_v1 = False
    if generator_settings is not None:
        # The CNN the generator trains through is known here only when it is given; a CNN trained by this call
        # is compared after phase 1 (a second plan), the rest of the generator run is checked now.
        known = cnn_sha256 if given_cnn is not None else None
        early = V2GeneratorTraining(layout, replace(generator_settings, property_cnn=known), outdir,
                                    changeable=RESUMABLE_OPTIONS + (() if known else ('property_cnn',)), ctx=ctx)
        generator_resume = resume and (given_cnn is not None or early.files.resume_record.is_file())
        needs_v1 = early.plan(resume=generator_resume, overwrite=overwrite).record is None
        if needs_v1 and v1_weights_path is not None:
            v1_file = _given_file(v1_weights_path, '--v1-weights', V1_SOURCE)
            v1_state = cpu_state_dict(load_conditional_generator(v1_file, 'v1'))
    scoring.check(overwrite, cnn_source, finished_sha256)  # after the generator run's own, more telling checks
    # Every image is decoded once before anything is written, unless no phase reads them: a rerun of a finished
    # CNN run whose CSVs are up to date skips the check (4,703 decodes).
    if finished_sha256 is None or not scoring.up_to_date(finished_sha256):
        dataset.verify(workers=cnn_settings.workers, progress=not cnn_settings.no_progress and ctx.is_main)
    if needs_v1 and v1_file is None:  # the default file, downloaded if absent: only once every other check passed
        v1_file = main_first(ctx, lambda: fetch(V1_SOURCE, layout))
        v1_state = cpu_state_dict(load_conditional_generator(v1_file, 'v1'))

    # --- phase 1: the CNN ---
    cnn_result = None
    if given_cnn is not None:
        cnn_model = given_cnn
    else:
        provenance = {'scores_csv': scores_csv.name, 'images': len(dataset), 'torch': torch.__version__}
        cnn_result = (cnn_phase.finished_result(cnn_plan) if cnn_plan.finished
                      else cnn_phase.train(cnn_plan, provenance))
        if cnn_result.status == 'interrupted':
            return V2Result(cnn_result, cnn_file, None, None)
        cnn_model = PropertyScoreCNN()
        cnn_model.load_state_dict(cnn_result.best_state)
        cnn_sha256 = state_sha256(cnn_result.best_state)

    # --- phase 2: the scores of every image (rank 0; the others wait) ---
    scoring_result = scoring.run(cnn_model.eval(), cnn_sha256, cnn_source) if ctx.is_main else None
    ctx.barrier()

    # --- phase 3: the generator ---
    generator_result = None
    if generator_settings is not None:
        generator_phase = V2GeneratorTraining(layout, replace(generator_settings, property_cnn=cnn_sha256), outdir,
                                              ctx=ctx)
        plan = generator_phase.plan(resume=generator_resume, overwrite=overwrite)
        if plan.finished:
            generator_result = generator_phase.finished_result(plan)
        else:
            provenance = {'property_cnn_file': cnn_file.name, 'property_cnn_sha256': cnn_sha256,
                          'torch': torch.__version__}
            if v1_file is not None:  # a resumed run keeps the provenance of its first start
                provenance.update(v1_file=v1_file.name, v1_sha256=sha256_of(v1_file))
            generator_result = generator_phase.train(plan, cnn_model, v1_state, provenance)
    ctx.barrier()  # the other ranks return once rank 0's files are on disk
    return V2Result(cnn_result, cnn_file, scoring_result, generator_result)
