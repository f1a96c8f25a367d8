"""Stage 3 from end to end (``run_segmentation.py``): list the input images, plan the work against the record,
detect and parse what is pending; return the report.

The input folder and the output folder are checked before the weights are fetched or loaded; nothing is loaded
when every image is already done.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ohlora.devices import disable_tf32, resolve_device
from ohlora.layout import Layout, image_name, name_form
from ohlora.records import weights_digest
from ohlora.weights import fetch
from segmentation import facexformer
from segmentation.face_detection import FaceDetector
from segmentation.parsing import (ParsingSummary, StageRecord, check_outputs, list_input_images, plan_work,
                                  run_info, run_stage, stage2_empty_reason, stage_settings)


@dataclass(frozen=True)
class Stage3Request:
    root: str | Path | None = None
    weights: str | Path | None = None   # FaceXFormer checkpoint (default: the published one)
    images: str | Path | None = None    # input folder (default: the stage-2 filtered images)
    batch_size: int = 16
    seed: int = 0                       # recorded only: nothing in this stage is random
    device: str | None = None
    progress: bool = True


@dataclass
class Stage3Report:
    layout: Layout
    images_dir: Path
    ignored: list[str]
    already_done: int
    settled_skips: int
    changed: int
    summary: ParsingSummary | None = None   # None: nothing was pending

    def lines(self) -> list[str]:
        out = []
        if self.ignored:
            out.append(f'ignoring {len(self.ignored)} files in {self.images_dir} that are not '
                       f'{name_form(image_name(0))} images (e.g. {self.ignored[0]})')
        if self.changed:
            out.append(f'{self.changed} images changed since they were parsed (other bytes under the same number); '
                       'parsed them again')
        earlier_skips = f', {self.settled_skips} skipped before' if self.settled_skips else ''
        segmentation_dir = self.layout.segmentation_dir
        if self.summary is None:
            out.append(f'nothing to do: {self.already_done} images parsed in {segmentation_dir}{earlier_skips}')
            return out
        skipped = (f'; skipped {len(self.summary.skipped)} (see {self.layout.segmentation_skipped_csv})'
                   if self.summary.skipped else '')
        out.append(f'parsed {self.summary.parsed} images ({self.already_done} already there{earlier_skips}){skipped}; '
                   f'results in {segmentation_dir}')
        return out


def run_stage3(request: Stage3Request) -> Stage3Report:
    """Parse every input image that has no up-to-date results; see :mod:`segmentation.parsing`."""
    layout = Layout(request.root)
    images_dir = Path(request.images) if request.images else layout.filtered_dir
    inputs = list_input_images(images_dir, None if request.images else stage2_empty_reason(layout))
    check_outputs(layout)

    weights = fetch('facexformer', layout, request.weights)
    settings = stage_settings(weights_digest(weights))
    work = plan_work(layout, inputs, settings)
    report = Stage3Report(layout, images_dir, inputs.ignored, work.finished, len(work.settled_skips), work.changed)
    if not work.pending:
        return report

    device = resolve_device(request.device)
    disable_tf32()
    model = facexformer.load_facexformer(weights, device)  # looked up at call time: tests stand in for it
    detector = FaceDetector()
    info = run_info(layout, images_dir=images_dir, weights=weights, device=device, batch_size=request.batch_size,
                    seed=request.seed, already_done=work.finished, ignored=inputs.ignored)
    report.summary = run_stage(layout, model, detector, work.pending, request.batch_size, device,
                               progress=request.progress, present={n for n, _ in inputs.images},
                               record=StageRecord(layout, settings, work.inputs, info))
    return report
