"""Flow ``atlas-to-section``: align one atlas to every brain or section of a manifest.

Parameters (fixed names): ``atlas`` (the atlas template image), ``manifest`` (YAML or CSV, see
:mod:`flows.manifest`), ``out`` (output folder); ``config``: the options
(:class:`~flows.config.AtlasToSectionOptions`, inline or a YAML path such as
``configs/flows/atlas_to_section.yaml``). Each item is the fixed image, the atlas the moving one: the
atlas and its labels are warped onto the item. One bad item never stops the batch; items whose
outputs exist and match their inputs are skipped. Outputs: ``<out>/<item>/`` per item (see
:mod:`flows.steps`), ``<out>/atlas/`` (the converted atlas), ``<out>/report.md``, ``<out>/report.json``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.config import AtlasToSectionOptions, Geometry, cluster_config, resolve_options
from flows.manifest import ManifestItem, ManifestProblem, default_name, load_manifest
from flows.records import ItemError, Outcomes, RunReport
from flows.runner import dask_task_runner, finish_run
from flows.steps import ImageInput, ItemJob, run_jobs

FLOW_NAME = "atlas-to-section"


def atlas_jobs(
    atlas: Path, entries: list[ManifestItem | ManifestProblem], out: Path, options: AtlasToSectionOptions
) -> tuple[list[ItemJob], list[ItemError]]:
    """One job per valid manifest item (sample fixed, atlas moving) and one error per invalid entry."""
    atlas_dir = out / "atlas"
    moving = ImageInput(path=atlas, geometry=options.atlas_geometry, converted=atlas_dir / "atlas.ome.zarr")
    moving_labels = None
    if options.atlas_labels:
        moving_labels = ImageInput(
            path=Path(options.atlas_labels),
            geometry=options.atlas_geometry,
            converted=atlas_dir / "atlas_labels.ome.zarr",
            labels=True,
        )
    jobs: list[ItemJob] = []
    errors: list[ItemError] = []
    for entry in entries:
        if isinstance(entry, ManifestProblem):
            errors.append(ItemError(name=entry.name, step="manifest", error_type="InputError", message=entry.message))
            continue
        item_dir = out / entry.name
        geometry = Geometry(voxel_size=entry.voxel_size, unit=entry.unit, orientation=entry.orientation)
        fixed_labels = None
        if entry.labels:
            fixed_labels = ImageInput(
                path=entry.labels, geometry=geometry, converted=item_dir / "sample_labels.ome.zarr", labels=True
            )
        jobs.append(
            ItemJob(
                name=entry.name,
                out_dir=item_dir,
                fixed=ImageInput(path=entry.path, geometry=geometry, converted=item_dir / "sample.ome.zarr"),
                moving=moving,
                fixed_labels=fixed_labels,
                moving_labels=moving_labels,
            )
        )
    return jobs, errors


@flow(name="align-items")
def align_items(jobs: list[ItemJob], options: AtlasToSectionOptions) -> Outcomes:
    """Run the jobs on this flow's task runner (set by the caller); see :func:`flows.steps.run_jobs`."""
    results, errors = run_jobs(jobs, options, options.max_parallel_items)
    return Outcomes(results=results, errors=errors)


@flow(name=FLOW_NAME)
def atlas_to_section(
    atlas: str, manifest: str, out: str, config: AtlasToSectionOptions | str | None = None
) -> RunReport:
    """Align ``atlas`` to every item of ``manifest``; write per-item outputs, QC and a report into ``out``.

    Returns:
        The :class:`~flows.records.RunReport` (per-item results and errors).
    """
    options = resolve_options(config, AtlasToSectionOptions)
    out_dir = Path(out)
    jobs, errors = atlas_jobs(Path(atlas), load_manifest(manifest), out_dir, options)
    with dask_task_runner(cluster_config(options)) as runner:
        outcomes = align_items.with_options(task_runner=runner)(jobs, options)
    outcomes = Outcomes(results=outcomes.results, errors=[*errors, *outcomes.errors])
    inputs = {"atlas": atlas, "manifest": manifest, "name": default_name(atlas)}
    return finish_run(FLOW_NAME, inputs, out_dir, outcomes)
