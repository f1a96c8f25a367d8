"""``merge_shards.py``: turn the shard records of a split stage run into exactly the files one process writes.

Each stage owns its merge (the stage modules are imported only when asked for); this module only picks it.
Under torchrun rank 0 calls the same functions itself, so only ``--shard i/n`` jobs need this step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ohlora.errors import PipelineError

STAGES = ('1', '2', '3', '6', 'directions')


@dataclass(frozen=True)
class MergeRequest:
    stage: str
    root: str | Path | None = None
    model: str = 'v3'                        # stage 6: which default output folder
    outdir: str | Path | None = None         # stage 6: --outdir of the shards
    sweep: str | None = None                 # stage 6: --sweep of the shards
    samples_dir: str | Path | None = None    # directions: --samples-dir of the shards
    progress: bool = True


@dataclass
class MergeReport:
    stage: str
    summary: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return list(self.summary)


def merge_shards(request: MergeRequest) -> MergeReport:
    """Merge the shards of ``request.stage``; one line (PipelineError) for a missing, unfinished or mismatched shard."""
    stage = request.stage
    if stage == '1':
        from stylegan.stage1 import merge_stage1_shards
        return MergeReport(stage, merge_stage1_shards(request.root))
    if stage == '2':
        from cnn.stage2 import merge_stage2_shards
        return MergeReport(stage, merge_stage2_shards(request.root, progress=request.progress).lines())
    if stage == '3':
        from segmentation.stage3 import merge_stage3_shards
        return MergeReport(stage, merge_stage3_shards(request.root).lines())
    if stage == '6':
        from stylegan_modified.stage6 import merge_stage6_shards
        return MergeReport(stage, merge_stage6_shards(request.root, request.model, request.outdir, request.sweep))
    if stage == 'directions':
        from stylegan_modified.direction_finding import merge_direction_shards
        return MergeReport(stage, merge_direction_shards(request.root, request.samples_dir))
    raise PipelineError(f'--stage {stage!r}: choose one of {", ".join(STAGES)}')
