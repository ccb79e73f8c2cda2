"""Flow ``register-pair``: convert if needed → register → warp image and labels → QC → metrics.

Parameters (fixed names): ``fixed``, ``moving`` (images: OME-Zarr, NIfTI, NRRD, TIFF), ``out`` (output
folder); ``config``: :class:`~flows.config.RegisterPairOptions` inline or a YAML path such as
``configs/flows/register_pair.yaml``. The outputs of :mod:`flows.steps` go straight into ``out``; a
rerun with the same inputs and options skips the work. The flow run fails when the pair fails.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.client.schemas.objects import State

from flows.config import RegisterPairOptions, resolve_options
from flows.manifest import default_name
from flows.records import RunReport
from flows.runner import final_state, finish_run, run_on_dask
from flows.settings import project_logs_in_the_run
from flows.steps import ImageInput, ItemJob

FLOW_NAME = "register-pair"


def pair_job(fixed: Path, moving: Path, out: Path, options: RegisterPairOptions) -> ItemJob:
    """The one job of a register-pair run; converted inputs go to ``out/{fixed,moving}[_labels].ome.zarr``."""

    def image(path: str | Path | None, role: str, geometry_role: str) -> ImageInput | None:
        if path is None:
            return None
        geometry = options.fixed_geometry if geometry_role == "fixed" else options.moving_geometry
        labels = role.endswith("_labels")
        return ImageInput(
            path=Path(path), geometry=geometry, converted=out / f"{role}.ome.zarr", labels=labels
        )

    return ItemJob(
        name=default_name(out),
        out_dir=out,
        fixed=image(fixed, "fixed", "fixed"),
        moving=image(moving, "moving", "moving"),
        fixed_labels=image(options.fixed_labels, "fixed_labels", "fixed"),
        moving_labels=image(options.moving_labels, "moving_labels", "moving"),
    )


@flow(name=FLOW_NAME)
def register_pair(
    fixed: str, moving: str, out: str, config: RegisterPairOptions | str | None = None
) -> RunReport | State:
    """Register ``moving`` onto ``fixed``; write the field, warped images, QC, metrics and a report to ``out``.

    Raises:
        flows.runner.BatchFailed: a step failed (the message names the step and the cause; the flow run
            ends ``Failed``, see :func:`flows.runner.final_state`).
    """
    with project_logs_in_the_run():
        options = resolve_options(config, RegisterPairOptions)
        out_dir = Path(out)
        job = pair_job(Path(fixed), Path(moving), out_dir, options)
        outcomes = run_on_dask([job], options, 1, [])
        return final_state(finish_run(FLOW_NAME, {"fixed": fixed, "moving": moving}, out_dir, outcomes))
