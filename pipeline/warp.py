"""``warp``: resample an image or label map through a displacement field, chunk by chunk (threads of this
process, or a Dask cluster: :func:`pipeline.cluster.open_executor`).

Directions (the field ``u`` maps a fixed world point ``x`` to the moving world point ``x + u(x)``):

* **forward** (default): a moving-space image onto the fixed grid, ``out(x) = M(x + u(x))``.
* **inverse** (``inverse=True``): a fixed-space image (e.g. atlas labels when the atlas was the fixed image)
  onto the moving image's grid, ``out(y) = F(y + v(y))`` with ``v`` the inverse displacement obtained by
  damped fixed-point iteration ``v ← v − λ (v + u(y + v))`` (:class:`~patchmorph_core.displacement.InverseDisplacement`),
  point by point, so each chunk needs only the part of the field its points map through. Every chunk also
  measures the inverse's residual ``|v(y) + u(y + v(y))|`` on a subsample of its voxels; the maximum and
  mean are returned in :class:`WarpRecord` and stored in the output's metadata.

Images are trilinear (rounded back to the input dtype, but float32 for an 8-bit one:
:func:`pipeline.ngff.level_dtype`); label maps take at each voxel the label with the largest summed trilinear
weight among its 8 neighbours (``label_interpolation: vote``,
:func:`~patchmorph_core.warping.vote_labels`, ANTs' ``GenericLabel``), or the nearest voxel's label.
Each write unit of the output (a Zarr chunk, or a whole shard for sharded arrays) is computed by one task
in cubes of the storage chunk shape, written once, then recorded in ``<out>.run/`` (:mod:`pipeline.resume`);
a rerun after a crash skips recorded units. A task's memory is set by the chunk and shard shapes. The task
also writes the first pyramid levels from the unit in memory, as long as the unit covers whole write units of
them (:func:`task_levels`: a shard of 4³ chunks gives levels 1 and 2 of a halving pyramid); the pyramid's
other levels are built after all tasks, from the last level they wrote (:func:`pipeline.ngff.finish_image`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from patchmorph_core.displacement import (
    INVERSE_ITERATIONS,
    Displacement,
    FieldDisplacement,
    InverseDisplacement,
    invert_points,
)
from patchmorph_core.errors import InputError
from patchmorph_core.labels import central_block, check_whole_numbers
from patchmorph_core.source import MultiscaleImage, float32_if_small
from patchmorph_core.spatial import Grid
from patchmorph_core.warping import Interpolation, LabelInterpolation, warp_to_grid
from pipeline.checks import check_free_space, check_outputs, check_writable, run_outputs, stored_fraction
from pipeline.chunked import ChunkPlan, output_array, run_chunked
from pipeline.cluster import load_cluster_config, open_executor
from pipeline.integrity import check_stored
from pipeline.ngff import (
    converted_pyramid,
    downsample_unit,
    finish_image,
    has_label_pyramid,
    is_label_image,
    level_dtype,
    pyramid_arrays,
    read_field,
    read_image,
    set_attribute,
    write_block,
    written_by_patchmorph,
)
from pipeline.register import IMAGES_IN_MEMORY_BYTES
from pipeline.resume import (
    ChunkId,
    StageRecords,
    check_inputs_unchanged,
    code_identity,
    content_identity,
    input_writes,
    locks_output,
    open_run,
    run_folder,
)

log = logging.getLogger(__name__)


ERROR_STRIDE = 4
"""The inverse's residual is measured at every ``ERROR_STRIDE``-th voxel of each chunk along each axis."""

FIELD_MEMORY_BYTES = 512 * 1024**2
"""A field up to this size is read once and shared with every task (else each task reads the box under it)."""


class WarpRecord(BaseModel):
    """What :func:`warp_files` wrote.

    Attributes:
        out: the warped image (OME-Zarr, on the target grid).
        labels: nearest-neighbour label map (True) or trilinear image (False).
        direction: ``"forward"`` (moving → fixed space) or ``"inverse"`` (fixed → moving space).
        grid_shape: output shape ``(Z, Y, X)``; ``unit``: its world unit.
        chunks: output chunks; ``skipped``: chunks found done by an earlier run.
        inverse_max_error, inverse_mean_error: residual of the inverse displacement (world units of the
            field; None for forward warps).
        seconds: wall time; ``dashboard``: Dask dashboard address used.
    """

    model_config = ConfigDict(extra="forbid")

    out: Path
    labels: bool
    direction: str
    grid_shape: tuple[int, int, int]
    unit: str
    chunks: int
    skipped: int
    inverse_max_error: float | None
    inverse_mean_error: float | None
    seconds: float
    dashboard: str


@dataclass(frozen=True)
class WarpContext:
    """What every warp task needs (picklable; sent to each worker once).

    Attributes:
        image: the image to resample (pyramid; the level matching the output spacing is read).
        displacement: ``u`` (forward) or the lazily inverted field (inverse), in ``plan.grid.unit``.
        forward: the forward field sampler (for the inverse's residual), or None.
        plan: output chunks on the output grid expressed in the field's unit.
        out: level-0 output array.
        interpolation: ``linear`` (images), ``vote`` or ``nearest`` (label maps).
        records: completion records.
        levels: the pyramid levels each task writes after level 0, with their downsampling factors
            (:func:`task_levels`).
    """

    image: MultiscaleImage
    displacement: Displacement
    forward: Displacement | None
    plan: ChunkPlan
    out: Any
    interpolation: Interpolation
    records: StageRecords
    levels: tuple[tuple[Any, tuple[int, int, int]], ...] = ()


def task_levels(level0: Any, levels: list[tuple[Any, tuple[int, int, int]]]) -> tuple[tuple[Any, tuple[int, int, int]], ...]:
    """The leading pyramid ``levels`` (arrays with their factors, :func:`pipeline.ngff.pyramid_arrays`) that a
    write unit of ``level0`` covers whole: the unit, downsampled, is a union of the level's write units (or
    reaches the array's end), so the task that writes the unit writes its part of them too, once."""
    unit = np.asarray(write_block(level0)[-3:], dtype=np.int64)
    scale = np.ones(3, dtype=np.int64)
    out = []
    for array, factors in levels:
        scale = scale * np.asarray(factors, dtype=np.int64)
        if np.any(unit % scale) or np.any((unit // scale) % np.asarray(write_block(array)[-3:], dtype=np.int64)):
            break
        out.append((array, factors))
    return tuple(out)


def warp_chunk(ctx: WarpContext, cid: ChunkId, partials: list[Any]) -> dict[str, Any]:
    """Task: resample one write unit (a chunk, or a whole shard), write it and its part of the first pyramid
    levels (``ctx.levels``) once, then record it.

    A shard is computed cube by cube in its storage chunks (:func:`~patchmorph_core.warping.warp_to_grid`
    with ``cube`` = the array's chunk shape) into one preallocated block of the output dtype, so the task's
    temporaries scale with the chunk, not the shard; the block is written whole, once. Also measures the
    inverse's residual on every ``ERROR_STRIDE``-th voxel for inverse warps.
    """
    tic = time.perf_counter()
    box = ctx.plan.box(cid)
    grid = ctx.plan.chunk_grid(cid)
    cube = tuple(ctx.out.chunks)[-3:]
    values = warp_to_grid(ctx.image, ctx.displacement, grid, ctx.interpolation, dtype=ctx.out.dtype, cube=cube)
    info: dict[str, Any] = {}
    if ctx.forward is not None:
        sub = tuple(np.arange(0, n, ERROR_STRIDE) for n in grid.shape)
        index = np.stack(np.meshgrid(*sub, indexing="ij"), axis=-1).reshape(-1, 3)
        _, residual = invert_points(ctx.forward, grid.index_to_world(index), INVERSE_ITERATIONS)
        norm = np.linalg.norm(residual, axis=-1)
        info.update(max_error=float(norm.max()), sum_error=float(norm.sum()), n_error=int(norm.size))
    ctx.records.log_write(cid)
    ctx.out[box.slices] = values
    start, stop = np.asarray(box.start), np.asarray(box.stop)
    for array, factors in ctx.levels:  # the pyramid's first levels from the unit in memory
        values = downsample_unit(values, factors, labels=ctx.interpolation != "linear")
        start, stop = start // factors, -(-stop // np.asarray(factors))
        array[tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))] = values
    info["seconds"] = time.perf_counter() - tic
    ctx.records.mark_done(cid, info)
    return info


def _inverse_error(stage: StageRecords, plan: ChunkPlan) -> tuple[float, float]:
    """Max and mean residual of the inverse displacement over all chunks' records (world units)."""
    entries = [json.loads(stage.record_path(cid).read_text()) for cid in plan.ids()]
    total = sum(e["n_error"] for e in entries)
    return max(e["max_error"] for e in entries), sum(e["sum_error"] for e in entries) / max(1, total)


def _record_inverse_error(out: Path, stage: StageRecords, plan: ChunkPlan) -> tuple[float, float]:
    """Store the inverse's residual (max, mean over all chunks) in the output's metadata and return it."""
    max_error, mean_error = _inverse_error(stage, plan)
    set_attribute(out, "inverse_error", {"max": max_error, "mean": mean_error, "unit": plan.grid.unit})
    log.info("inverse displacement residual: max %.4g, mean %.4g %s", max_error, mean_error, plan.grid.unit)
    return max_error, mean_error


def _target_grid(target: str | Path | None, meta: dict[str, Any], inverse: bool) -> tuple[Grid, str]:
    """Output grid: ``target``'s, else the fixed (forward) or moving (inverse) image named in the field."""
    role = "moving" if inverse else "fixed"
    path = target if target is not None else meta.get(role)
    if path is None:
        raise InputError(
            f"the field does not name its {role} image: pass --target with the image to warp onto."
        )
    if not Path(path).exists() and "://" not in str(path):
        raise InputError(
            f"target image {path} does not exist: pass --target with an existing OME-Zarr image."
        )
    return read_image(path).grid, str(path)


def check_named_fixed_image(field_grid: Grid, fixed: Grid, fixed_path: str, field: str | Path) -> None:
    """Refuse the fixed image the field names (its recorded path, read from the current folder when relative) when
    it does not cover the field's box (:meth:`Grid.same_box`): it is another image than the one registered (a
    field named ``brain.ome.zarr`` read from another animal's folder), whose grid the warp would silently take.

    Raises:
        InputError: naming the field, the image and what to do.
    """
    if not field_grid.same_box(fixed.with_unit(field_grid.unit)):
        raise InputError(
            f"the fixed image the field {field} names, {fixed_path}, does not cover the field's box: it is another "
            "image than the one registered (a relative path read from another folder?): pass --target with the "
            "image the field was registered on."
        )


def check_space(image: Grid, target: Grid, meta: dict[str, Any], inverse: bool, moving: str | Path) -> None:
    """Refuse an image that covers the output grid's box already (at any resolution: :meth:`Grid.same_box`), when
    the space it is to come from has another box: an image of the fixed space given to a forward warp (or of the
    moving space to an inverse one), which would be resampled as if it were in the other space.

    Raises:
        InputError: naming the image and the way round.
    """
    source_role, target_role = ("fixed", "moving") if inverse else ("moving", "fixed")
    source = meta.get(source_role)
    if source is None or not Path(source).exists() or not image.same_box(target):
        return
    if read_image(source).grid.same_box(target):  # both images of the registration cover one box
        return
    way = "without --inverse" if inverse else "with --inverse (or through the inverse field)"
    raise InputError(
        f"image {moving} covers the box of the field's {target_role} image, not the {source_role} image's, whose "
        f"space this warp takes images from: it is in {target_role} space already; to bring it to the "
        f"{source_role} space, warp it {way}."
    )


def check_label_values(array: Any, moving: str | Path) -> None:
    """Refuse to warp ``array`` (an image's level 0, ``(Z, Y, X)``) as a label map when it holds values that are no
    label: a float image with fractional values in the block at its centre
    (:func:`~patchmorph_core.labels.central_block`: one read, bounded; an intensity image given with ``--labels``
    would become a "label map" of every intensity it holds).

    Raises:
        InputError: naming the image, a value and what to do.
    """
    if not np.issubdtype(np.dtype(array.dtype), np.floating):
        return
    check_whole_numbers(
        central_block(array), f"image {moving}", "it is an intensity image, not a label map; warp it without --labels.",
        skip_nonfinite=True,
    )  # fmt: skip


@locks_output
def warp_files(
    field: str | Path,
    moving: str | Path,
    out: str | Path,
    labels: bool = False,
    target: str | Path | None = None,
    inverse: bool = False,
    chunk_size: int | None = None,
    workers: int | None = None,
    scheduler: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    keep_run: bool = False,
    label_interpolation: LabelInterpolation = "vote",
) -> WarpRecord:
    """Warp an image or label map through a field (see the module docstring), chunk by chunk.

    Args:
        field: displacement field written by ``register`` (fixed → moving).
        moving: the image to warp (OME-Zarr): in moving space for a forward warp, in fixed space for
            ``inverse``.
        out: output image (``.zarr``).
        labels: label resampling (``label_interpolation``) and label metadata (for label maps).
        target: image whose grid the output takes (default: the field's fixed image, or its moving image
            for ``inverse``).
        inverse: warp a fixed-space image into moving space through the inverted field.
        chunk_size: output voxels per chunk edge (default 64).
        workers, scheduler: as in :func:`pipeline.register.register_files`.
        overwrite: replace a finished output.
        progress: show a progress bar.
        keep_run: keep the run folder ``<out>.run`` (per-chunk records) after the run finishes; by default it
            is removed then (it exists only to resume).
        label_interpolation: with ``labels``: ``vote`` (the label of largest summed trilinear weight among a
            point's 8 neighbours) or ``nearest``.

    Raises:
        InputError: bad input, before heavy work starts, or another run writing ``out``
            (:func:`pipeline.resume.output_lock`, held while this runs).
    """
    tic = time.perf_counter()
    out = Path(out)
    check_outputs(inputs={"field": field, "image": moving, "target": target}, outputs=run_outputs(out))
    cluster_config = load_cluster_config(scheduler, workers)
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"--chunk-size {chunk_size} is invalid: give a positive number of voxels.")
    if not Path(field).exists():
        raise InputError(f"field {field} does not exist: give the output of `patchmorph register`.")
    if not Path(moving).exists():
        raise InputError(f"image {moving} does not exist: give the OME-Zarr image to warp.")
    if not labels and is_label_image(moving):
        raise InputError(
            f"image {moving} is a label image (NGFF image-label): warp it with --labels, or its ids would be "
            "blended into values that are no label."
        )
    run_root = run_folder(out, overwrite)
    field_arr, field_grid, meta = read_field(field)
    grid, target_path = _target_grid(target, meta, inverse)
    if target is None and not inverse:
        check_named_fixed_image(field_grid, grid, target_path, field)
    image = read_image(moving).with_unit(field_grid.unit)
    if labels and len(image.levels) > 1 and not has_label_pyramid(moving):
        log.info("%s: its coarser levels were not written by PatchMorph and may hold no labels: reading its finest", moving)
        image = MultiscaleImage(image.levels[:1], image.name)
    elif not labels and not written_by_patchmorph(moving):  # its converted copy's level for the target grid
        image = converted_pyramid(image, moving, "image", IMAGES_IN_MEMORY_BYTES, target=grid)
    for array in (field_arr, *(level.array for level in image.levels)):
        check_stored(array)  # a lost chunk file is refused before heavy work
    check_space(image.grid, grid.with_unit(field_grid.unit), meta, inverse, moving)
    if labels:
        check_label_values(image.levels[0].array, moving)
    dtype = level_dtype(getattr(image.levels[0].array, "dtype", np.float32), labels)  # a mask's values kept
    check_writable(out.parent)
    check_free_space(  # + pyramid
        out.parent, int(np.prod(grid.shape)) * dtype.itemsize * 4 // 3, f"the warped image {out}", stored_fraction(image, dtype)
    )
    forward = FieldDisplacement(float32_if_small(field_arr, FIELD_MEMORY_BYTES), field_grid)
    displacement: Displacement = InverseDisplacement(forward, INVERSE_ITERATIONS) if inverse else forward
    fingerprint = {
        "field": content_identity(field),
        "image": content_identity(moving),
        "target": content_identity(target_path),
        "labels": labels,
        "label_interpolation": label_interpolation if labels else None,
        "inverse": inverse,
        "chunk_size": chunk_size,
        "code": code_identity(),
    }
    reading = input_writes({"field": field, "moving": moving})
    records = open_run(run_root, fingerprint, overwrite)
    stage = records.stage("warp")
    extra = {
        "warped": {
            "field": str(field),
            "image": str(moving),
            "direction": "inverse" if inverse else "forward",
            **({"label_interpolation": label_interpolation} if labels else {}),
        }
    }
    array = output_array(
        out,
        grid,
        dtype,
        chunk_size,
        None,
        bool(stage.completed()),
        labels=labels,
        name=out.stem,
        extra_attrs=extra,
    )
    plan = ChunkPlan(grid.with_unit(field_grid.unit), tuple(write_block(array))[-3:])  # type: ignore[arg-type]
    levels = task_levels(array, pyramid_arrays(out, fresh=False))  # kept on resume: finished units wrote them
    context = WarpContext(
        image, displacement, forward if inverse else None, plan, array, label_interpolation if labels else "linear",
        stage, levels,
    )  # fmt: skip
    with open_executor(cluster_config) as executor:
        run = run_chunked(executor, "warp", plan, stage, context, warp_chunk, progress=progress)
        check_inputs_unchanged(reading, out)
        client = getattr(executor, "client", None)  # on a cluster: its workers
        finish_image(out, client=client, written=len(levels), progress=progress)
    max_error, mean_error = _record_inverse_error(out, stage, plan) if inverse else (None, None)
    records.finish()
    if not keep_run:
        shutil.rmtree(run_root)
    log.info("wrote %s %s (grid %s, %s)", "labels" if labels else "image", out, grid.shape, grid.unit)
    return WarpRecord(
        out=out,
        labels=labels,
        direction="inverse" if inverse else "forward",
        grid_shape=grid.shape,
        unit=grid.unit,
        chunks=run.chunks,
        skipped=run.skipped,
        inverse_max_error=max_error,
        inverse_mean_error=mean_error,
        seconds=time.perf_counter() - tic,
        dashboard=executor.dashboard,
    )
