"""Your own atlas as a BrainGlobe atlas folder: a template image, its label image and a table of its structures
(e.g. an MRI-based marmoset atlas, distributed as NIfTI files), written in BrainGlobe's TIFF layout
(:func:`pipeline.brainglobe.write_tiff_atlas`) so that ``patchmorph atlas --atlas FOLDER`` and every BrainGlobe
tool read it.

The template and the labels must lie on one grid whose axes follow an orientation code (no oblique axes: a
BrainGlobe atlas has a resolution per array axis and a code, nothing else). Their array order is kept; the code
and the resolution in micrometres come from the files' headers (NIfTI, NRRD, OME-Zarr) or from the options
(TIFF), as for ``patchmorph convert``. The volumes are read whole: atlases are small next to the brains.

Structure tables are read in the formats atlases come with (:func:`read_structure_table`): BrainGlobe's
``structures.json``, a CSV or TSV with a header (``id``, ``name``, optional ``acronym`` and ``parent_id`` or
``structure_id_path``), an ITK-SNAP label description (``IDX R G B A VIS MSH "LABEL"``), a FreeSurfer colour
table (``ID NAME R G B A``) and a two-column list (``ID NAME``, as SynthSeg's). Every structure hangs below one
root (a table without hierarchy gets a root named ``root``), as in BrainGlobe atlases.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patchmorph_core.errors import InputError
from patchmorph_core.labels import check_whole_numbers
from patchmorph_core.spatial import RIGHTWARD, Grid, orientation_code, unit_scale
from pipeline.brainglobe import Structure, structures_from_list, write_tiff_atlas
from pipeline.importers import ALLEN_CCF_NRRD_ORIENTATION, allen_ccf_nrrd, open_input, stated_orientation

logger = logging.getLogger(__name__)

ROOT_ID = 997
"""Id of the root a table without one gets (BrainGlobe's and the Allen atlas's root id), unless a structure holds
it (then one more than the largest id)."""

ID_COLUMNS = ("id", "structure_id", "label", "index", "value", "annotation_value")
NAME_COLUMNS = ("name", "structure_name", "label_name", "structure")
ACRONYM_COLUMNS = ("acronym", "abbreviation", "short_name")
PARENT_COLUMNS = ("parent_id", "parent_structure_id", "parent")
"""Column names (lower case) a CSV or TSV table's id, name, acronym and parent may have."""


# -- structure tables -------------------------------------------------------------------------------------------
def read_structure_table(path: str | Path) -> list[Structure]:
    """The structures of an atlas's table (formats in the module doc), in the file's order; ids of 0 (background)
    are left out. Paths are set from the table's hierarchy where it has one (else empty;
    :func:`with_root` completes them)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"structure table {str(path)!r} does not exist: check the path.")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except ValueError as err:
            raise InputError(
                f"structure table {path} is not valid JSON ({err}): give BrainGlobe's list."
            ) from err
        found = list(structures_from_list(items, path).values())
    elif path.suffix.lower() in (".csv", ".tsv"):
        found = _delimited_table(text, "\t" if path.suffix.lower() == ".tsv" else ",", path)
    else:
        found = _text_table(text)
    found = [s for s in found if s.id != 0]
    if not found:
        raise InputError(
            f"structure table {path} lists no structure: give a CSV/TSV with id and name columns, BrainGlobe's "
            "structures.json, an ITK-SNAP label description or a FreeSurfer colour table."
        )
    return found


def _column(header: Sequence[str], names: Sequence[str]) -> str | None:
    """The first of ``names`` among the ``header``'s columns (compared in lower case)."""
    lower = {h.strip().lower(): h for h in header}
    return next((lower[n] for n in names if n in lower), None)


def _delimited_table(text: str, delimiter: str, path: Path) -> list[Structure]:
    """Structures of a CSV or TSV table with a header row (columns in :data:`ID_COLUMNS` etc.)."""
    rows = csv.DictReader(text.splitlines(), delimiter=delimiter)
    header = rows.fieldnames or []
    id_col, name_col = _column(header, ID_COLUMNS), _column(header, NAME_COLUMNS)
    if id_col is None or name_col is None:
        raise InputError(
            f"structure table {path} has columns {list(header)}: it needs an id column ({', '.join(ID_COLUMNS)}) "
            f"and a name column ({', '.join(NAME_COLUMNS)})."
        )
    acronym_col, parent_col = _column(header, ACRONYM_COLUMNS), _column(header, PARENT_COLUMNS)
    path_col = _column(header, ("structure_id_path",))
    found, parents = [], {}
    for number, row in enumerate(rows, start=2):
        try:
            sid = int(float(row[id_col]))
        except (TypeError, ValueError) as err:
            raise InputError(
                f"structure table {path}, line {number}: the id {row[id_col]!r} is not a number."
            ) from err
        name = (row[name_col] or "").strip()
        acronym = (row.get(acronym_col) or "").strip() if acronym_col else ""
        ids = tuple(int(v) for v in re.findall(r"\d+", row.get(path_col) or "")) if path_col else ()
        if parent_col and (row.get(parent_col) or "").strip() and not ids:
            parents[sid] = int(float(row[parent_col]))
        found.append(Structure(sid, name or str(sid), acronym or name or str(sid), ids))
    return _paths_from_parents(found, parents, path) if parents else found


def _text_table(text: str) -> list[Structure]:
    """Structures of a whitespace-separated table: lines whose first field is an integer id; the name is a quoted
    field (ITK-SNAP, whose next three fields are the colour), else the fields after the id less four trailing
    integers (a FreeSurfer colour table's RGBA). Other lines (comments, headers, prose) are skipped."""
    found = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = shlex.split(line, posix=True) if '"' in line else line.split()
        if not fields or not re.fullmatch(r"-?\d+", fields[0]):
            continue
        rgb: tuple[int, ...] = (255, 255, 255)
        if '"' in line:  # ITK-SNAP: IDX R G B A VIS MSH "LABEL"
            name = next((f for f in reversed(fields) if not re.fullmatch(r"-?[\d.]+", f)), fields[0])
            if len(fields) >= 5 and all(re.fullmatch(r"\d+", f) for f in fields[1:4]):
                rgb = tuple(int(f) for f in fields[1:4])
        else:
            rest = fields[1:]
            if len(rest) > 4 and all(re.fullmatch(r"\d+", f) for f in rest[-4:]):  # FreeSurfer: ID NAME R G B A
                rgb, rest = tuple(int(f) for f in rest[-4:-1]), rest[:-4]
            name = " ".join(rest)
        sid = int(fields[0])
        colour = tuple(min(max(v, 0), 255) for v in rgb)
        found.append(Structure(sid, name or str(sid), name or str(sid), rgb=colour))  # type: ignore[arg-type]
    return found


def _paths_from_parents(found: list[Structure], parents: Mapping[int, int], where: Path) -> list[Structure]:
    """``found`` with each structure's path from its parents (a structure without a listed parent is a root)."""
    out = []
    for s in found:
        path, node = [s.id], s.id
        while node in parents:
            node = parents[node]
            if node in path:
                raise InputError(
                    f"structure table {where}: structure {s.id}'s parents form a cycle through {node}."
                )
            path.append(node)
        out.append(dataclasses.replace(s, path=tuple(reversed(path))))
    return out


def with_root(structures: Sequence[Structure], present: Sequence[int]) -> list[Structure]:
    """Every structure's path from one root, and a structure for every id of ``present`` that the table lacks
    (named ``label <id>``, with a warning).

    When the paths the table gives start at one id, that is the root: structures without a path hang below it
    (and it is added as ``root`` if the table does not list it). Otherwise every structure hangs below a new root
    ``root`` (id :data:`ROOT_ID`, or one more than the largest id when that is taken)."""
    by_id = {s.id: s for s in structures}
    missing = sorted(int(i) for i in present if int(i) != 0 and int(i) not in by_id)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        logger.warning(
            "the label image holds %d ids the structure table lacks (%s): named 'label <id>'",
            len(missing),
            shown,
        )
    items = [*structures, *(Structure(i, f"label {i}", str(i)) for i in missing)]
    starts = {s.path[0] for s in items if s.path}
    ids = {s.id for s in items}
    root = starts.pop() if len(starts) == 1 else ROOT_ID if ROOT_ID not in ids else max(ids) + 1
    hung = [
        s
        if s.path[:1] == (root,)
        else dataclasses.replace(s, path=(root,) if s.id == root else (root, *(s.path or (s.id,))))
        for s in items
    ]
    return hung if root in ids else [Structure(root, "root", "root", (root,)), *hung]


# -- volumes ----------------------------------------------------------------------------------------------------
def check_table_matches(
    table: Sequence[Structure], present: np.ndarray, where: str | Path | None, labels: Path
) -> None:
    """Refuse a structure table that names none of the label image's ids (``present``, 0 the background): it
    belongs to another atlas or counts its ids differently, and every structure would be named ``label <id>``."""
    ids = {int(i) for i in present if int(i) != 0}
    if not table or not ids or ids & {s.id for s in table}:
        return
    shown = ", ".join(map(str, sorted(s.id for s in table)[:5]))
    raise InputError(
        f"the structure table {where} names none of the {len(ids)} ids of the label image {labels} (the table's "
        f"ids start {shown}; the image's {', '.join(map(str, sorted(ids)[:5]))}): give the table that belongs to "
        "this label image, or leave --structures out to name every id 'label <id>'."
    )


def _read_volume(path: Path, role: str, overrides: Mapping[str, Any]) -> tuple[np.ndarray, Grid]:
    """A volume of the atlas, read whole, and its grid.

    Raises:
        InputError: the template states no orientation (TIFF, a plain OME-Zarr) and none is given: an atlas read
            with an assumed code has its sides and axes wrong everywhere it is used.
    """
    if overrides.get("orientation") is None and Path(path).name.lower().endswith(".nrrd"):
        import nrrd

        if allen_ccf_nrrd(nrrd.read_header(str(path))):
            raise InputError(
                f"the {role} {path} is an Allen CCFv3 NRRD file, whose header's orientation "
                "(left-posterior-superior) is wrong: give --orientation "
                f"{ALLEN_CCF_NRRD_ORIENTATION}, or the atlas's hemispheres and axes would be wrong."
            )
    array, grid, kind = open_input(path, **overrides)
    if role == "template" and overrides.get("orientation") is None and stated_orientation(path, kind) is None:
        raise InputError(
            f"the template {path} states no anatomical orientation ({kind}): give --orientation, the code of its "
            "array axes (e.g. 'asr': axis 0 from anterior, axis 1 from superior, axis 2 from right; find it with "
            "'patchmorph convert --preview'), or an atlas registered with a guessed code would have its "
            "hemispheres and axes wrong."
        )
    logger.info("reading the %s %s %s", role, path, tuple(array.shape))
    return np.asarray(array.compute()), grid


def check_hemisphere_sides(sides: np.ndarray, grid: Grid, where: Path) -> None:
    """Refuse a hemisphere image whose left (1) lies to the right of its right (2) in the template's world frame
    (its orientation code read as given): a swapped image would swap the hemispheres of every brain. ``sides``:
    ``(Z, Y, X)`` values 0, 1, 2 on ``grid`` (the template's).

    Raises:
        InputError: naming the image, its code and the fix.
    """
    centres = {}
    for side in (1, 2):
        index = np.argwhere(sides[::2, ::2, ::2] == side) * 2.0
        if len(index) == 0:
            return  # one hemisphere only: nothing to compare
        centres[side] = grid.index_to_world(index.mean(axis=0))[RIGHTWARD]
    if centres[1] > centres[2]:
        code = orientation_code(grid.direction)
        raise InputError(
            f"the hemisphere image {where} has 1 (left) to the right of 2 (right) when the template's axes are read "
            f"as '{code}': swap 1 and 2 in it, or, if the left side is where it says, give the template's correct "
            "--orientation."
        )


def reference_uint16(values: np.ndarray, where: Path) -> np.ndarray:
    """The template as BrainGlobe stores it, uint16 of ``values``' ``(Z, Y, X)`` shape: integers within 0-65535 as
    they are, others scaled linearly from their range onto 0-65535 (an MRI template in floats, say)."""
    finite = np.isfinite(values)
    if not finite.all():
        raise InputError(
            f"the template {where} holds NaN or infinite values ({int(values.size - finite.sum())} voxels): replace "
            "them (e.g. by 0) first."
        )
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if hi <= lo:
        raise InputError(f"the template {where} is constant ({lo:g}): give the atlas's template image.")
    if np.issubdtype(values.dtype, np.integer) and lo >= 0 and hi <= 65535:
        return values.astype(np.uint16)
    logger.info(
        "template %s: values %g-%g scaled onto 0-65535 (uint16, as BrainGlobe stores templates)",
        where,
        lo,
        hi,
    )
    scaled = (values.astype(np.float64) - lo) * (65535.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint16)


def label_ids(values: np.ndarray, where: Path, what: str = "label image") -> np.ndarray:
    """``values`` (the ``(Z, Y, X)`` label or hemisphere image) as uint32 label ids of the same shape; an image with
    negative, fractional or too large values is refused."""
    check_whole_numbers(
        values, f"the {what} {where}", "give the atlas's label image (one integer id per structure), not a template "
        "or a probability map.",
    )  # fmt: skip
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.uint32).max):
        raise InputError(
            f"the {what} {where} holds ids outside 0-{np.iinfo(np.uint32).max}: give a label image."
        )
    return values.astype(np.uint32)


def grid_difference(grid: Grid, other: Grid) -> str:
    """What differs between ``other`` and ``grid`` (the template's), in words: shape, voxel size, axes, and where
    voxel 0 lies (in voxels and in ``grid``'s unit)."""
    other = other.with_unit(grid.unit)
    parts = []
    if other.shape != grid.shape:
        parts.append(f"shape {tuple(other.shape)}, the template's {tuple(grid.shape)}")
    if not np.allclose(other.spacing, grid.spacing, rtol=1e-5, atol=0.0):
        parts.append(f"voxel size {[float(f'{v:.6g}') for v in other.spacing]} {grid.unit}, the template's "
                     f"{[float(f'{v:.6g}') for v in grid.spacing]}")  # fmt: skip
    if not np.allclose(other.direction, grid.direction, atol=1e-5):
        parts.append("axes in other directions")
    offset = float(np.linalg.norm(other.affine[:3, 3] - grid.affine[:3, 3]))
    if offset > 0.0:
        voxels = offset / float(grid.spacing.min())
        parts.append(f"voxel 0 {offset:.3g} {grid.unit} ({voxels:.3g} voxels) from the template's")
    return "; ".join(parts) or "headers that differ in their last digits"


def sides_everywhere(sides: np.ndarray) -> np.ndarray:
    """A hemisphere image with a side at every voxel, as BrainGlobe's are: a voxel that the given image leaves at 0
    (around the brain; an MRI atlas's map often ends where its labels do) takes the side of the nearest voxel it
    has. Otherwise the template's rim around one hemisphere, and labelled voxels the map missed, belonged to no side:
    ``--brain-geometry`` kept the other hemisphere's rim in the template, and their volumes were counted nowhere.
    ``sides``: ``(Z, Y, X)`` values 0, 1, 2; returned with its shape and dtype."""
    if sides.all() or not sides.any():
        return sides
    from scipy import ndimage

    nearest = ndimage.distance_transform_edt(sides == 0, return_distances=False, return_indices=True)
    logger.info("hemisphere image: %d voxels outside it take the side of the nearest voxel in it", int((sides == 0).sum()))
    return sides[tuple(nearest)]


def make_atlas(
    folder: str | Path,
    reference: str | Path,
    annotation: str | Path,
    structures: str | Path | None = None,
    hemispheres: str | Path | None = None,
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    orientation: str | None = None,
) -> Path:
    """Write a BrainGlobe atlas folder (TIFF layout) from a template, its labels and their table.

    Args:
        folder: the atlas folder to create (must not exist; written whole or not at all).
        reference: the template image (any input ``patchmorph convert`` reads).
        annotation: the label image, on the template's grid (integer ids, 0 background).
        structures: the structure table (:func:`read_structure_table`); None: every id of the label image is a
            structure named ``label <id>``.
        hemispheres: an image of the hemispheres on the template's grid (1 left, 2 right, 0 outside); None:
            the atlas is symmetric, and its hemispheres are the halves of its left-right axis, as BrainGlobe
            makes them (only right for a template centred on its midline).
        name: the atlas's name without resolution (e.g. ``mbm_marmoset``); None: the folder's name (without a
            version suffix such as ``_v1.0``).
        metadata: more BrainGlobe metadata (``citation``, ``atlas_link``, ``species``, ``version``).
        voxel_size, unit, orientation: as ``patchmorph convert``'s options, for every image (TIFF needs them).

    Returns:
        The folder.
    """
    folder = Path(folder)
    if folder.exists():
        raise InputError(f"atlas folder {folder} already exists: remove it or choose another folder.")
    if not folder.parent.is_dir():  # a mistyped path would make a tree of folders
        raise InputError(f"folder {folder.parent} does not exist: create it first, or give -o inside one that exists.")
    table = read_structure_table(structures) if structures is not None else []
    overrides = {"voxel_size": voxel_size, "unit": unit, "orientation": orientation}
    paths = {"template": Path(reference), "label image": Path(annotation)}
    if hemispheres is not None:
        paths["hemisphere image"] = Path(hemispheres)
    volumes = {role: _read_volume(path, role, overrides) for role, path in paths.items()}
    grid = volumes["template"][1]
    for role, (_, other) in volumes.items():
        if not grid.same_voxels(other):  # the same shape, and header within a thousandth of a voxel
            raise InputError(
                f"the {role} {paths[role]} is not on the template's grid ({grid_difference(grid, other)}; a thousandth "
                "of a voxel is allowed): resample it onto the template (labels by nearest neighbour), or, if both "
                "were made on one grid and only their headers differ, give it the template's header, and try again."
            )
    code = orientation_code(grid.direction)
    if code is None:
        raise InputError(
            f"the template {paths['template']} has oblique axes (direction {np.round(grid.direction, 3).tolist()}): "
            "a BrainGlobe atlas's axes follow an orientation code; reslice the template and labels to an "
            "axis-aligned grid, or give --orientation."
        )
    labels = label_ids(volumes["label image"][0], paths["label image"])
    present = np.unique(labels)
    check_table_matches(table, present, structures, paths["label image"])
    sides = None
    if hemispheres is not None:
        sides = label_ids(volumes["hemisphere image"][0], paths["hemisphere image"], "hemisphere image")
        if not set(np.unique(sides).tolist()) <= {0, 1, 2}:
            raise InputError(
                f"the hemisphere image {hemispheres} holds values other than 0, 1 (left) and 2 (right)."
            )
        check_hemisphere_sides(sides, grid, paths["hemisphere image"])
        sides = sides_everywhere(sides)
    else:
        logger.warning("no hemisphere image: the atlas's hemispheres are the halves of its left-right axis")
    resolution = [round(float(s), 4) for s in grid.spacing * unit_scale(grid.unit, "micrometer")]  # float32 headers
    # by default the folder's name (without a version suffix): a template file is often just 'template.nii.gz'
    atlas_name = name or re.sub(r"[^a-z0-9]+", "_", re.sub(r"_v\d+(\.\d+)*$", "", folder.name.lower())).strip("_")
    meta = {
        "name": atlas_name,
        "citation": "unpublished",
        "atlas_link": "",
        "species": "",
        "version": "1.0",
        **(metadata or {}),
        "resolution": resolution,
        "orientation": code,
    }
    template = reference_uint16(volumes["template"][0], paths["template"])
    return write_tiff_atlas(folder, template, labels, with_root(table, present), meta, sides)
