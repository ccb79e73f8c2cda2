"""Wiring shared by the registration flows: typed jobs, stage-by-stage fan-out, per-item records.

A :class:`ItemJob` is one registration (fixed ← moving, plus optional label maps) with its output
folder. :func:`run_jobs` takes a list of jobs through the steps convert → register → warp (image and
labels) → QC and metrics → atlas outputs (jobs with a BrainGlobe atlas), one step at a time for a group of at most ``max_parallel`` jobs: the tasks of
one step are submitted together to the flow's task runner (Dask), their results collected, and a job
whose task failed leaves the group with an :class:`~flows.records.ItemError` naming that step; the
others go on. Jobs whose ``done.json`` matches their inputs and options are skipped
(:func:`split_finished`, before any cluster starts), and a converted input whose
``<target>.source.json`` matches its source is reused, so a rerun resumes.

Output folder of a job::

    <out_dir>/field.ome.zarr           displacement field (+ uncertainty child image)
    <out_dir>/warped.ome.zarr          moving image on the fixed grid
    <out_dir>/warped_labels.ome.zarr   moving labels on the fixed grid (when given)
    <out_dir>/qc/*.png                 overlay, checkerboard, jacobian, uncertainty
    <out_dir>/metrics.json             scalar metrics
    <out_dir>/done.json                completion record (written last)

and, with a BrainGlobe atlas, what ``patchmorph atlas`` writes (:func:`pipeline.atlas.atlas_item_outputs`)::

    <out_dir>/brain.ome.zarr           the sample (always a copy) with labels/{atlas,hemispheres,boundaries}
    <out_dir>/brain_in_atlas_space.ome.zarr, inverse_field.ome.zarr, volumes.csv
    <out_dir>/qc/*.png                 overlay, atlas_space, jacobian, uncertainty
    <out_dir>/summary.md, summary.json the one-page summary (:func:`pipeline.atlas_job.write_job_summary`)
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture, wait
from pydantic import BaseModel, ConfigDict

from flows.config import Geometry, StepOptions
from flows.records import (
    DONE_FILE,
    REGISTRATION_FILE,
    ItemError,
    ItemResult,
    fingerprint,
    finished_result,
    record_registration,
    reusable_registration,
    write_done,
)
from flows.tasks import (
    atlas_outputs_task,
    convert_task,
    converted_from,
    metrics_task,
    qc_task,
    register_task,
    warp_task,
)
from patchmorph_core.errors import InputError
from patchmorph_core.spatial import unit_scale
from pipeline.atlas import AtlasRange, BrainGeometry, range_record, range_text
from pipeline.atlas_job import atlas_inference, atlas_reference_name, job_summary, write_job_summary
from pipeline.brainglobe import find_atlas
from pipeline.checks import check_outputs
from pipeline.importers import channel_option, open_input
from pipeline.ngff import read_field, written_by_patchmorph
from pipeline.register import field_warnings
from pipeline.resume import input_writes, write_identity

logger = logging.getLogger(__name__)

_ZARR_MARKERS = ("zarr.json", ".zattrs", ".zgroup")


def _written_by_patchmorph(path: Path) -> bool:
    """:func:`pipeline.ngff.written_by_patchmorph`, False for a store it cannot open (its conversion then names
    what is wrong)."""
    try:
        return written_by_patchmorph(path)
    except InputError:
        return False


class ImageInput(BaseModel):
    """An input image or label map and where its OME-Zarr 0.5 copy goes when it must be converted.

    Attributes:
        path: the input as the user gave it.
        geometry: voxel size, unit, orientation for inputs that do not carry them.
        converted: where the converted copy is written (unused when ``path`` is already OME-Zarr and
            ``geometry`` asks for nothing).
        labels: a label map (nearest-neighbour pyramid, integer dtype kept).
        always_copy: always write the converted copy (an image whose labels will be nested inside it: a user's
            own OME-Zarr is never written into).
        channel_index: of a multi-channel OME-Zarr image or TIFF stack, the channel (0-based) that is the input
            (always converted).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    geometry: Geometry = Geometry()
    converted: Path
    labels: bool = False
    always_copy: bool = False
    channel_index: int | None = None

    @property
    def needs_conversion(self) -> bool:
        """False when ``path`` is an OME-Zarr group PatchMorph wrote, no geometry override is given and no copy is
        asked for. Another tool's OME-Zarr (ome-zarr-py, bioformats2raw) is converted: its pyramid (or its lack of
        one) is not what the registration expects (:func:`pipeline.ngff.converted_pyramid`), and a label map's
        coarser levels may hold interpolated ids."""
        if self.always_copy or self.channel_index is not None:
            return True
        is_zarr = self.path.is_dir() and any((self.path / m).is_file() for m in _ZARR_MARKERS)
        overrides = self.geometry.voxel_size is not None or self.geometry.orientation is not None
        return not is_zarr or overrides or not _written_by_patchmorph(self.path)

    @property
    def ready(self) -> Path:
        """The OME-Zarr image the registration reads."""
        return self.converted if self.needs_conversion else self.path


class ItemJob(BaseModel):
    """One registration: ``moving`` (e.g. the atlas) aligned onto ``fixed`` (e.g. a sample).

    With ``atlas`` (a BrainGlobe atlas folder whose images were prepared in ``atlas_dir``) the job also
    writes the atlas outputs of :func:`pipeline.atlas.atlas_item_outputs`; ``atlas_placement``: the search's record
    per direction when ``atlas_range`` was found (:func:`pipeline.atlas_job.resolve_atlas_range`), for its summary.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    out_dir: Path
    fixed: ImageInput
    moving: ImageInput
    fixed_labels: ImageInput | None = None
    moving_labels: ImageInput | None = None
    atlas: str | None = None
    atlas_dir: Path | None = None
    brain_geometry: BrainGeometry = "full"
    atlas_range: AtlasRange = {}
    atlas_placement: dict[str, Any] = {}
    channels: dict[str, ImageInput] = {}

    @property
    def field(self) -> Path:
        """Output displacement field."""
        return self.out_dir / "field.ome.zarr"

    @property
    def warped(self) -> Path:
        """Output moving image on the fixed grid."""
        return self.out_dir / "warped.ome.zarr"

    @property
    def warped_labels(self) -> Path | None:
        """Output moving labels on the fixed grid (None without moving labels)."""
        return self.out_dir / "warped_labels.ome.zarr" if self.moving_labels else None

    def outputs(self) -> dict[str, Path]:
        """Everything the job writes or replaces, by role: its outputs with their run folders, QC figures,
        records and the converted copies of its inputs."""
        paths: dict[str, Path] = {}
        for role, path in (("field", self.field), ("warped", self.warped), ("warped_labels", self.warped_labels)):
            if path is not None:
                paths.update({role: path, f"{role} run folder": path.with_name(path.name + ".run")})
        paths.update(qc=self.out_dir / "qc", metrics=self.out_dir / "metrics.json", done=self.out_dir / DONE_FILE)
        paths["registration record"] = self.out_dir / REGISTRATION_FILE
        for role, image in self.inputs().items():
            if image.needs_conversion:
                paths[f"converted {role}"] = image.converted
        return paths

    def check_names(self) -> dict[str, str]:
        """How the registration's checks name ``fixed`` and ``moving``: the paths the manifest gave, an atlas by
        its name (with the hemisphere and the range it was cut to), not their converted copies."""
        moving = str(self.moving.path) if self.atlas is None else atlas_reference_name(
            Path(self.atlas).name, self.brain_geometry, option="brain_geometry", atlas_range=self.atlas_range,
            range_option="atlas_range",
        )  # fmt: skip
        return {"fixed": str(self.fixed.path), "moving": moving}

    def inputs(self) -> dict[str, ImageInput]:
        """The job's inputs by role."""
        roles = {"fixed": self.fixed, "moving": self.moving}
        if self.fixed_labels:
            roles["fixed_labels"] = self.fixed_labels
        if self.moving_labels:
            roles["moving_labels"] = self.moving_labels
        roles.update({f"channel_{name}": image for name, image in self.channels.items()})
        return roles

    def key(self, options: StepOptions) -> str:
        """Fingerprint of the inputs' metadata, their geometry and the options that shape the outputs."""
        return self._fingerprint(self.inputs(), options, {"qc": options.qc, "label_interpolation": options.label_interpolation})

    def registration_key(self, options: StepOptions) -> str:
        """Fingerprint of what the item's field is made from: the fixed and moving inputs with their geometry, the
        atlas's part and the registration settings; not the labels, channels, QC or label warping, so that an item
        given another channel or labels keeps its finished registration (hours on a terabyte brain)."""
        return self._fingerprint({"fixed": self.fixed, "moving": self.moving}, options, {})

    def _fingerprint(self, inputs: dict[str, ImageInput], options: StepOptions, extra: dict[str, Any]) -> str:
        """:func:`~flows.records.fingerprint` of ``inputs`` (paths, content, geometry, channel of a multi-channel
        file), the atlas's part, the registration settings and ``extra`` settings."""
        channels = {role: image.channel_index for role, image in inputs.items() if image.channel_index is not None}
        settings = {
            "atlas": self.atlas,
            "brain_geometry": self.brain_geometry,
            **({"atlas_range": range_text(self.atlas_range)} if self.atlas_range else {}),  # none: earlier runs' key
            **({"channel_index": channels} if channels else {}),  # none: earlier runs' key
            "geometry": {role: image.geometry.model_dump(mode="json") for role, image in inputs.items()},
            "inference": options.inference.model_dump(mode="json"),
            **extra,
        }
        return fingerprint({role: image.path for role, image in inputs.items()}, settings)


def item_failed(name: str, step: str, error: BaseException) -> ItemError:
    """The error record of item ``name`` that failed at ``step``, logged as a warning (so that the flow run's log
    names every failed item, not only the first its final message names)."""
    logger.warning("item %s failed at %s: %s: %s", name, step, type(error).__name__, error)
    return ItemError(name=name, step=step, error_type=type(error).__name__, message=str(error))


def _collect(futures: dict[str, PrefectFuture[Any]]) -> dict[str, Any]:
    """Wait for all futures; the value of each, or the exception it failed with."""
    wait(list(futures.values()))
    return {key: future.result(raise_on_failure=False) for key, future in futures.items()}


def _step(
    jobs: list[ItemJob],
    step: str,
    submit: Callable[[ItemJob], dict[str, PrefectFuture[Any]]],
    errors: list[ItemError],
) -> tuple[list[ItemJob], dict[str, dict[str, Any]]]:
    """Submit one step for every job, then keep the jobs whose tasks all succeeded.

    Returns:
        The surviving jobs and, by job name, the values of that job's tasks (by task key).
    """
    futures = {job.name: submit(job) for job in jobs}
    flat = {f"{name}\0{key}": fut for name, futs in futures.items() for key, fut in futs.items()}
    values = _collect(flat)
    survivors: list[ItemJob] = []
    by_job: dict[str, dict[str, Any]] = {}
    for job in jobs:
        results = {key: values[f"{job.name}\0{key}"] for key in futures[job.name]}
        failure = next((v for v in results.values() if isinstance(v, BaseException)), None)
        if failure is not None:
            errors.append(item_failed(job.name, step, failure))
            continue
        survivors.append(job)
        by_job[job.name] = results
    return survivors, by_job


def conversion_key(image: ImageInput) -> str:
    """The fingerprint of ``image``'s source (its channel) and geometry its conversion is recorded with
    (:func:`converted_from`)."""
    settings = {"geometry": image.geometry.model_dump(mode="json"), **channel_option(image.channel_index)}
    return fingerprint({"source": image.path}, settings)


def _convert_inputs(jobs: list[ItemJob], convert: Task[..., Path], errors: list[ItemError]) -> list[ItemJob]:
    """Convert every input that needs it, once per target (a shared atlas is converted once, into a folder
    created here)."""
    pending: dict[Path, ImageInput] = {}
    for job in jobs:
        for image in job.inputs().values():
            if image.needs_conversion and not converted_from(image.converted, conversion_key(image)):
                pending[image.converted] = image
    for target in pending:
        with contextlib.suppress(OSError):  # a folder that cannot be made fails the conversion with a sentence
            target.parent.mkdir(parents=True, exist_ok=True)
    futures = {
        str(target): convert.submit(
            image.path,
            target,
            image.geometry.voxel_size,
            image.geometry.unit,
            image.geometry.orientation,
            image.labels,
            conversion_key(image),
            image.channel_index,
        )
        for target, image in pending.items()
    }
    values = _collect(futures)
    survivors = []
    for job in jobs:
        failed = [values[str(img.converted)] for img in job.inputs().values() if str(img.converted) in values]
        failure = next((v for v in failed if isinstance(v, BaseException)), None)
        if failure is None:
            survivors.append(job)
        else:
            errors.append(item_failed(job.name, "convert", failure))
    return survivors


def _finish(
    job: ItemJob,
    key: str,
    qc_record: Any,
    metrics: dict[str, float],
    seconds: float,
    atlas: Any = None,
    register_seconds: float | None = None,
    registration_reused: bool = False,
) -> ItemResult:
    """Write ``metrics.json`` and the completion record of a finished job (with its atlas outputs, if any, and
    their one-page ``summary.md`` / ``summary.json`` as ``patchmorph atlas`` writes them; ``registration_reused``:
    its field was made by an earlier run, which ``register_seconds`` timed)."""
    outputs = {"fixed": job.fixed.ready, "field": job.field, "warped": job.warped}
    if job.warped_labels is not None:
        outputs["warped_labels"] = job.warped_labels
    figures = dict(qc_record.figures) if qc_record is not None else {}
    if register_seconds is not None:
        metrics = {**metrics, "register_seconds": round(float(register_seconds), 1)}
    if atlas is not None and job.atlas is not None:
        outputs.update({role: p for role, p in atlas.paths.items() if not role.startswith("qc_")})
        outputs.update({f"channel_{name}": image.ready for name, image in job.channels.items()})
        figures.update({role[3:]: p for role, p in atlas.paths.items() if role.startswith("qc_")})
        metrics = {**metrics, **lengths_in_micrometres(atlas.figures, read_field(job.field)[1].unit)}
        summary = job_summary(
            find_atlas(job.atlas).name, atlas.figures, atlas.paths, seconds, register_seconds, registration_reused
        )
        warnings = field_warnings(job.field)  # the registration's (a part of a brain, an assumed orientation)
        summary["atlas_range"] = range_record(job.atlas_range)  # as 'patchmorph atlas' has it
        if job.atlas_placement:
            summary["atlas_placement"] = job.atlas_placement
        outputs.update(write_job_summary(job.out_dir, {**summary, "warnings": warnings}, atlas.paths))
    metrics_path = job.out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    outputs["metrics"] = metrics_path
    result = ItemResult(
        name=job.name, out_dir=job.out_dir, outputs=outputs, qc=figures, metrics=metrics, seconds=seconds,
        source=str(job.fixed.path),
    )  # fmt: skip
    write_done(job.out_dir, result, key)
    return result


LENGTH_FIGURES = ("inverse_max_error", "inverse_mean_error")
"""An atlas item's figures that are lengths in its field's unit (micrometres for one brain, millimetres for another)."""


def lengths_in_micrometres(figures: dict[str, Any], unit: str) -> dict[str, Any]:
    """``figures`` with every length of :data:`LENGTH_FIGURES` (in ``unit``) in micrometres, its name ending in
    ``_um``, so that a batch's table compares items of different units."""
    out = {k: v for k, v in figures.items() if k not in LENGTH_FIGURES}
    out.update({f"{k}_um": float(figures[k]) * unit_scale(unit, "micrometer") for k in LENGTH_FIGURES if k in figures})
    return out


def missing_inputs(jobs: Sequence[ItemJob]) -> tuple[list[ItemJob], list[ItemError]]:
    """Jobs whose input paths all exist, whose channel indices are channels of their files (read from the headers)
    and whose outputs overlap none of their inputs (:func:`pipeline.checks.check_outputs`), and an ``inputs`` error
    for each other job."""
    ready: list[ItemJob] = []
    errors: list[ItemError] = []
    for job in jobs:
        missing = [(role, image.path) for role, image in job.inputs().items() if not image.path.exists()]
        try:
            if missing:
                role, path = missing[0]
                raise InputError(f"{role} input {path} does not exist: fix the path (or the manifest entry).")
            for role, image in job.inputs().items():
                if image.channel_index is not None:
                    _check_channel_index(role, image)
            check_outputs(inputs={r: i.path for r, i in job.inputs().items()}, outputs=job.outputs())
        except InputError as err:
            errors.append(item_failed(job.name, "inputs", err))
            continue
        ready.append(job)
    return ready, errors


def _check_channel_index(role: str, image: ImageInput) -> None:
    """Refuse ``image``'s channel index when its file has no such channel (:func:`pipeline.importers.open_input`,
    which reads the header only), naming ``role``."""
    geometry = image.geometry
    try:
        open_input(image.path, geometry.voxel_size, geometry.unit, geometry.orientation, channel_index=image.channel_index)
    except InputError as err:
        raise InputError(f"{role} input: {err}") from err


def split_finished(jobs: Sequence[ItemJob], options: StepOptions) -> tuple[list[ItemResult], list[ItemJob]]:
    """Separate jobs whose outputs exist and match their inputs (``status="skipped"``) from the rest.

    Reads only file metadata and ``done.json`` records, so a fully finished batch needs no cluster.
    """
    finished: list[ItemResult] = []
    todo: list[ItemJob] = []
    for job in jobs:
        earlier = None if options.overwrite else finished_result(job.out_dir, job.key(options))
        if earlier is not None:
            logger.info("item %s: outputs exist and match their inputs, skipped", job.name)
            finished.append(earlier)
        else:
            if (job.out_dir / DONE_FILE).is_file() and not options.overwrite:
                logger.warning(
                    "item %s: its inputs or settings changed since it finished: it is made again, and its earlier "
                    "outputs in %s are replaced",
                    job.name, job.out_dir,
                )  # fmt: skip
            todo.append(job)
    return finished, todo


def run_jobs(
    jobs: Sequence[ItemJob], options: StepOptions, max_parallel: int
) -> tuple[list[ItemResult], list[ItemError]]:
    """Take jobs through every step on the current flow's task runner; never raises for one bad job.

    Args:
        jobs: the registrations to run (names unique; see :func:`split_finished` for skipping).
        options: registration, retry and QC options.
        max_parallel: jobs in flight at once; groups of this size go through all steps in turn.

    Returns:
        ``(results, errors)``: one record per job, in job order within each list.
    """
    retry = {"retries": options.retries, "retry_delay_seconds": options.retry_delay_seconds}
    convert, register, warp = (t.with_options(**retry) for t in (convert_task, register_task, warp_task))
    make_qc, metrics, atlas = (t.with_options(**retry) for t in (qc_task, metrics_task, atlas_outputs_task))
    results: list[ItemResult] = []
    errors: list[ItemError] = []
    todo = list(jobs)
    keys = {job.name: job.key(options) for job in todo}
    field_keys = {job.name: job.registration_key(options) for job in todo}
    for start in range(0, len(todo), max_parallel):
        began = time.monotonic()
        group = _make_folders(todo[start : start + max_parallel], errors)
        group = _convert_inputs(group, convert, errors)
        read_from = {j.name: _input_writes(j) for j in group}
        group = _converted_as_asked(group, errors)
        # an item whose registration finished in an earlier run (it failed at a later step) keeps its field
        reused = {
            j.name: record
            for j in group
            if not options.overwrite and (record := reusable_registration(j.out_dir, field_keys[j.name], j.field)) is not None
        }
        for name in reused:
            logger.info("item %s: its registration finished in an earlier run and is reused", name)
        group, registered = _step(
            group,
            "register",
            lambda j, reused=reused: {} if j.name in reused else {
                "field": register.submit(
                    j.fixed.ready,
                    j.moving.ready,
                    j.field,
                    options.inference if j.atlas is None else atlas_inference(options.inference),
                    options.chunk_size,
                    options.register_cluster,
                    options.register_workers,
                    options.checks,
                    j.check_names(),
                    j.atlas is not None and j.brain_geometry == "full" and not j.atlas_range,
                )
            },
            errors,
        )
        for job in group:
            if job.name not in reused:
                record_registration(job.out_dir, field_keys[job.name], job.field, registered[job.name]["field"])
        group, _ = _step(group, "warp", lambda j: _submit_warps(j, warp, options), errors)
        group, values = _step(group, "qc", lambda j: _submit_checks(j, make_qc, metrics, options.qc), errors)
        group, atlas_values = _step(group, "atlas", lambda j: _submit_atlas(j, atlas, options), errors)
        seconds = time.monotonic() - began
        group = _inputs_kept(group, read_from, errors)
        for job in group:
            out = values[job.name]
            made = atlas_values[job.name].get("atlas")
            field = reused[job.name] if job.name in reused else registered[job.name]["field"]
            figures = {**out["metrics"], **quality_metrics(field.quality)}
            results.append(
                _finish(job, keys[job.name], out.get("qc"), figures, seconds, made, field.seconds, job.name in reused)
            )
    return results, errors


def _converted_as_asked(jobs: list[ItemJob], errors: list[ItemError]) -> list[ItemJob]:
    """The jobs whose converted inputs hold what this run asked for (their record names this run's source and
    geometry); an ``inputs`` error for each other one: another run into the same folder converted a shared input
    (the atlas) with other settings after this run converted it."""
    return _keep_unless(
        jobs,
        errors,
        lambda job: [
            str(image.converted)
            for image in job.inputs().values()
            if image.needs_conversion and not converted_from(image.converted, conversion_key(image))
        ],
        "was converted again by another run with other settings (a run into the same folder with another atlas "
        "geometry) after this run converted it: rerun this item, and give runs with other settings their own output "
        "folder.",
    )


def _input_writes(job: ItemJob) -> dict[str, tuple[Path, str | None]]:
    """Each input store the job reads, by role, with its ``write_id`` (:func:`pipeline.resume.input_writes`)."""
    return input_writes({role: image.ready for role, image in job.inputs().items()})


def _inputs_kept(
    jobs: list[ItemJob], read_from: dict[str, dict[str, tuple[Path, str | None]]], errors: list[ItemError]
) -> list[ItemJob]:
    """The jobs whose input stores are still the ones they read from the start (:func:`_input_writes`); an
    ``inputs`` error for each other one: another run into the same folder with other settings wrote a shared input
    (the converted or prepared atlas) again while the job read it, so its field and its warps may come from two
    different atlases. It is not recorded as done, so a rerun makes it again."""
    return _keep_unless(
        jobs,
        errors,
        lambda job: [str(path) for path, written in read_from[job.name].values() if write_identity(path) != written],
        "was written again by another run while this item read it (a run into the same folder with other atlas "
        "settings): its outputs may mix the two; rerun it, and give runs with other settings their own output folder.",
    )


def _keep_unless(
    jobs: list[ItemJob], errors: list[ItemError], problems: Callable[[ItemJob], list[str]], sentence: str
) -> list[ItemJob]:
    """The jobs in which ``problems`` finds no path; for each other one an ``inputs`` error: the paths, then
    ``sentence``."""
    kept = []
    for job in jobs:
        found = problems(job)
        if found:
            errors.append(item_failed(job.name, "inputs", InputError(f"{', '.join(found)} {sentence}")))
        else:
            kept.append(job)
    return kept


def quality_metrics(block: dict[str, Any]) -> dict[str, float]:
    """The item metrics of a field's quality block (:mod:`pipeline.quality`), for the run's report."""
    return {
        "quality_ncc_initial": float(block["similarity"]["initial"]),
        "quality_ncc_final": float(block["similarity"]["final"]),
        "quality_folded_tissue_percent": float(block["folding"]["folded_percent"]),
        "quality_inverse_p99_voxels": float(block["inverse"]["percentiles_voxels"]["99"]),
        "quality_passed": float(block["passed"]),
    }


def _make_folders(jobs: list[ItemJob], errors: list[ItemError]) -> list[ItemJob]:
    """The jobs whose output folder exists or could be created; an ``outputs`` error for each other one."""
    made = []
    for job in jobs:
        try:
            job.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            errors.append(item_failed(job.name, "outputs", err))
            continue
        made.append(job)
    return made


def _submit_warps(job: ItemJob, warp: Task[..., Any], options: StepOptions) -> dict[str, PrefectFuture[Any]]:
    shared = (job.fixed.ready, options.chunk_size, options.register_cluster, options.register_workers)
    futures = {"image": warp.submit(job.field, job.moving.ready, job.warped, False, *shared)}
    if job.moving_labels is not None and job.warped_labels is not None:
        futures["labels"] = warp.submit(
            job.field, job.moving_labels.ready, job.warped_labels, True, *shared, options.label_interpolation
        )
    return futures


def _submit_checks(
    job: ItemJob, make_qc: Task[..., Any], metrics: Task[..., Any], with_qc: bool
) -> dict[str, PrefectFuture[Any]]:
    fixed_labels = job.fixed_labels.ready if job.fixed_labels else None
    futures = {
        "metrics": metrics.submit(job.fixed.ready, job.warped, job.field, fixed_labels, job.warped_labels)
    }
    if with_qc and job.atlas is None:  # an atlas job's QC figures come with its atlas outputs
        futures["qc"] = make_qc.submit(
            job.fixed.ready, job.warped, job.field, job.out_dir / "qc", job.warped_labels
        )
    return futures


def _submit_atlas(job: ItemJob, atlas: Task[..., Any], options: StepOptions) -> dict[str, PrefectFuture[Any]]:
    if job.atlas is None or job.atlas_dir is None:
        return {}
    return {
        "atlas": atlas.submit(
            job.fixed.ready,
            job.field,
            job.atlas,
            job.atlas_dir,
            job.out_dir,
            options.register_cluster,
            options.qc,
            options.label_interpolation,
            job.brain_geometry,
            {name: image.ready for name, image in job.channels.items()},
            dict(job.atlas_range),
        )
    }
