"""Displacement fields for the benchmarks: known deformations, their band decomposition, errors against them,
the ANTs peer's fields in our frame, the inverse's residual and the uncertainty map's agreement with the error.

Conventions are the project's (:mod:`patchmorph_core.spatial`): a field is ``(3, Z, Y, X)`` on a
:class:`~patchmorph_core.spatial.Grid`, component ``k`` the world displacement along world component ``k``
(z, y, x) in the grid's unit, and it maps a fixed point ``x`` to the moving point ``x + u(x)``.

**Bands of wavelengths.** A field is split into bands by differences of Gaussian low-passes, in world units:
with edges ``λ_0 > λ_1 > ... > λ_n``, ``L_k = G(λ_k) * u`` and the bands are ``L_0`` (wavelengths longer than
``λ_0``), ``L_k - L_{k-1}`` (between ``λ_k`` and ``λ_{k-1}``) and ``u - L_n`` (shorter than ``λ_n``). They sum
to ``u`` exactly. ``G(λ)`` is the isotropic Gaussian (in world units, whatever the voxel size) whose transfer
function is one half at wavelength ``λ``: ``exp(-2π²σ²/λ²) = 1/2``, i.e. ``σ = λ / LAMBDA_PER_SIGMA``. A known
deformation is built from the same bands (white noise per band, scaled to a stated amplitude), and the error
of an estimate is split by the same filters, so truth and error are measured alike.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, stats

from patchmorph_core.displacement import FieldDisplacement, invert_points
from patchmorph_core.metrics import jacobian_determinant
from patchmorph_core.spatial import Grid, grid_affine_from_ras, resample, sample_field, unit_scale

LAMBDA_PER_SIGMA = math.pi / math.sqrt(math.log(2.0) / 2.0)
"""Wavelength (in units of σ) at which a Gaussian low-pass passes half the amplitude (≈ 5.34)."""

GAUSSIAN_TRUNCATE = 3.0
"""The Gaussian kernels are cut at this many σ."""


# -- bands --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Band:
    """Wavelengths from ``shortest`` to ``longest`` (grid unit; None: 0 or unbounded)."""

    shortest: float | None
    longest: float | None

    def label(self, unit: str = "µm") -> str:
        """``"800-1600 µm"``, ``"> 3200 µm"`` or ``"< 100 µm"``."""
        if self.longest is None:
            return f"> {self.shortest:g} {unit}"
        if self.shortest is None:
            return f"< {self.longest:g} {unit}"
        return f"{self.shortest:g}-{self.longest:g} {unit}"


def check_edges(edges: Sequence[float]) -> list[float]:
    """The band edges as floats, longest first; ValueError unless strictly decreasing and positive."""
    values = [float(e) for e in edges]
    if not values or any(e <= 0 for e in values) or any(a <= b for a, b in itertools.pairwise(values)):
        raise ValueError(
            f"band edges {edges} must be positive wavelengths, longest first, strictly decreasing"
        )
    return values


def bands(edges: Sequence[float]) -> list[Band]:
    """The ``len(edges) + 1`` bands that ``edges`` (wavelengths, longest first) delimit, coarsest first."""
    values = check_edges(edges)
    bounds: list[float | None] = [None, *values, None]
    return [Band(shortest=bounds[i + 1], longest=bounds[i]) for i in range(len(values) + 1)]


def low_pass(values: np.ndarray, grid: Grid, wavelength: float, mode: str = "nearest") -> np.ndarray:
    """Gaussian low-pass of a ``(Z, Y, X)`` or ``(C, Z, Y, X)`` array on ``grid``: half amplitude at
    ``wavelength`` (grid unit), isotropic in world units (σ per axis = σ / spacing).

    ``mode`` is SciPy's edge handling: ``"nearest"`` (edges extended) for fields, ``"wrap"`` for noise (a
    periodic noise keeps one variance up to the edges, where an extended edge sample would dominate).
    """
    sigma_vox = (wavelength / LAMBDA_PER_SIGMA) / grid.spacing
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim == 3:
        return ndimage.gaussian_filter(arr, sigma_vox, mode=mode, truncate=GAUSSIAN_TRUNCATE)
    return np.stack([low_pass(a, grid, wavelength, mode) for a in arr])


def band_parts(values: np.ndarray, grid: Grid, edges: Sequence[float]) -> Iterator[np.ndarray]:
    """The band parts of ``values`` (``(C, Z, Y, X)`` or ``(Z, Y, X)``), coarsest first; they sum to
    ``values``. A generator: at most three arrays of the input's size are held at once."""
    previous: np.ndarray | None = None
    for wavelength in check_edges(edges):
        current = low_pass(values, grid, wavelength)
        yield current if previous is None else current - previous
        previous = current
    assert previous is not None
    yield np.asarray(values, dtype=np.float32) - previous


# -- known deformations -------------------------------------------------------------------------------------
def band_limited_field(
    grid: Grid,
    edges: Sequence[float],
    amplitudes: Sequence[float],
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """A random smooth displacement with a stated amplitude in each band of wavelengths.

    Band ``b`` of ``bands(edges)`` gets white noise (three components) filtered to that band (periodically,
    so the field is statistically the same everywhere on the grid) and scaled so that the root mean square
    of its vector length over ``mask`` (default: the whole grid) is ``amplitudes[b]`` (grid unit; 0 leaves
    the band empty).

    Returns:
        ``(3, Z, Y, X)`` float32 field on ``grid``, components ``(z, y, x)`` in the grid's unit.
    """
    values = check_edges(edges)
    if len(amplitudes) != len(values) + 1 or any(a < 0 for a in amplitudes):
        raise ValueError(f"give {len(values) + 1} non-negative amplitudes for the edges {values}")
    inside = np.ones(grid.shape, bool) if mask is None else np.asarray(mask, bool)
    out = np.zeros((3, *grid.shape), dtype=np.float32)
    for index, amplitude in enumerate(amplitudes):
        if amplitude == 0:
            continue
        noise = rng.standard_normal((3, *grid.shape), dtype=np.float32)
        part = _one_band(noise, grid, values, index)
        rms = float(np.sqrt((part[:, inside] ** 2).sum(axis=0).mean()))
        out += part * np.float32(amplitude / rms)
    return out


def _one_band(values: np.ndarray, grid: Grid, edges: list[float], index: int) -> np.ndarray:
    """Band ``index`` of ``bands(edges)`` of the noise ``values`` (two periodic low-passes at most)."""
    upper = low_pass(values, grid, edges[index - 1], "wrap") if index > 0 else None
    lower = (
        low_pass(values, grid, edges[index], "wrap") if index < len(edges) else np.asarray(values, np.float32)
    )
    return lower if upper is None else lower - upper


def affine_displacement(grid: Grid, matrix: np.ndarray) -> np.ndarray:
    """``(3, Z, Y, X)`` displacement ``A x + t - x`` of a 4×4 world→world ``matrix`` at the grid's voxels."""
    points = grid.points()
    moved = points @ np.asarray(matrix, np.float64)[:3, :3].T + np.asarray(matrix, np.float64)[:3, 3]
    return np.moveaxis(moved - points, -1, 0).astype(np.float32)


def small_affine(
    rng: np.random.Generator, center: np.ndarray, max_angle_deg: float, max_shift: float, max_scale: float
) -> np.ndarray:
    """A random 4×4 world→world affine about ``center``: rotation about a random axis by at most
    ``max_angle_deg``, per-axis scaling in ``1 ± max_scale`` and a shift of at most ``max_shift`` per axis."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_angle_deg, max_angle_deg))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross
    linear = rotation @ np.diag(1.0 + rng.uniform(-max_scale, max_scale, size=3))
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = center - linear @ center + rng.uniform(-max_shift, max_shift, size=3)
    return matrix


def warp_array(array: np.ndarray, array_grid: Grid, grid: Grid, field: np.ndarray, order: int) -> np.ndarray:
    """``array ∘ φ`` on ``grid``: the value of ``array`` (on ``array_grid``, same world and unit) at
    ``x + u(x)`` for every voxel ``x`` of ``grid``, ``field`` being ``(3, Z, Y, X)`` on ``grid`` (order 0 for
    labels, 1 for images; outside: 0), by :func:`~patchmorph_core.spatial.resample`."""
    source = np.asarray(array)
    moved = grid.points() + np.moveaxis(np.asarray(field, np.float64), 0, -1)
    dtype = source.dtype if order == 0 else np.float32
    return resample(source, array_grid, moved, order=order, cval=0.0, dtype=dtype)


# -- comparing fields ---------------------------------------------------------------------------------------
def field_on_grid(field: Any, field_grid: Grid, grid: Grid, slab: int = 16) -> np.ndarray:
    """A field resampled (linearly, constant-extended) at the voxels of ``grid``, in ``grid``'s unit.

    Returns:
        ``(3, Z, Y, X)`` float32 on ``grid``.
    """
    to_field = unit_scale(grid.unit, field_grid.unit)
    values = np.asarray(field, dtype=np.float32)
    out = np.empty((3, *grid.shape), dtype=np.float32)
    for start in range(0, grid.shape[0], slab):
        stop = min(start + slab, grid.shape[0])
        part = grid.crop((start, 0, 0), (stop, *grid.shape[1:]))
        sampled = sample_field(values, field_grid, part.points() * to_field) / to_field
        out[:, start:stop] = np.moveaxis(sampled, -1, 0)
    return out


def length_stats(vectors: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Median, 95th percentile, maximum and RMS of the vector length of a ``(3, Z, Y, X)`` field (inside
    ``mask``)."""
    length = np.sqrt((np.asarray(vectors, np.float64) ** 2).sum(axis=0))
    values = length if mask is None else length[np.asarray(mask, bool)]
    return {
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
        "rms": float(np.sqrt((values**2).mean())),
    }


def band_stats(
    values: np.ndarray, grid: Grid, edges: Sequence[float], mask: np.ndarray
) -> list[dict[str, float]]:
    """:func:`length_stats` of each band part of a ``(3, Z, Y, X)`` field inside ``mask``, coarsest first."""
    return [length_stats(part, mask) for part in band_parts(values, grid, edges)]


def band_errors(
    estimate: np.ndarray,
    truth: np.ndarray,
    grid: Grid,
    edges: Sequence[float],
    mask: np.ndarray,
    truth_stats: list[dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Per band of wavelengths: the truth's content and the estimate's error there, inside ``mask``.

    Each row: ``band`` (label), ``shortest`` / ``longest`` (grid unit), ``truth`` and ``error`` length
    statistics (:func:`length_stats`) and ``recovered``, ``1 - rms(error) / rms(truth)`` (1: the band is
    recovered; 0: no better than the identity; negative: worse). ``truth_stats`` (:func:`band_stats` of the
    truth) saves recomputing them when one truth scores many estimates.
    """
    truth_rows = truth_stats if truth_stats is not None else band_stats(truth, grid, edges, mask)
    error_rows = band_stats(np.asarray(estimate, np.float32) - truth, grid, edges, mask)
    rows = []
    for band, truth_row, error_row in zip(bands(edges), truth_rows, error_rows, strict=True):
        rows.append(
            {
                "band": band.label(),
                "shortest": band.shortest,
                "longest": band.longest,
                "truth": truth_row,
                "error": error_row,
                "recovered": 1.0 - error_row["rms"] / truth_row["rms"] if truth_row["rms"] > 0 else None,
            }
        )
    return rows


def folds(field: np.ndarray, grid: Grid, mask: np.ndarray | None = None) -> dict[str, float]:
    """% of voxels with det J <= 0 and the smallest det J, inside ``mask`` if given."""
    det = jacobian_determinant(np.asarray(field, np.float32), grid)
    values = det if mask is None else det[np.asarray(mask, bool)]
    return {"folding_percent": float(100.0 * np.mean(values <= 0)), "jacobian_min": float(values.min())}


# -- the ANTs peer's fields -----------------------------------------------------------------------------------
LPS_TO_OURS = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
"""ITK's physical LPS vector ``(L, P, S)`` → our RAS+ frame in ``(z, y, x)`` order ``(S, A, R)``."""


def read_itk_field(path: Path) -> tuple[np.ndarray, Grid]:
    """An ITK/ANTs displacement field (NIfTI vector image, physical LPS mm) as ours.

    Returns:
        ``(field, grid)``: ``(3, Z, Y, X)`` float32 in millimetres, components ``(S, A, R)`` — our world —
        on the file's grid (axes reversed as :func:`~pipeline.importers.load_nifti` does).
    """
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] != 3:
        raise ValueError(
            f"{path} is not a 3-D displacement field (shape {data.shape}, expected (X, Y, Z, 1, 3))"
        )
    vectors = data[:, :, :, 0, :].transpose(2, 1, 0, 3) @ LPS_TO_OURS.T.astype(np.float32)
    grid = Grid(vectors.shape[:3], grid_affine_from_ras(image.affine), "millimeter")
    return np.ascontiguousarray(np.moveaxis(vectors, -1, 0)), grid


# -- the inverse and the uncertainty ----------------------------------------------------------------------------
def inverse_residual(field: np.ndarray, grid: Grid, mask: np.ndarray, iterations: int) -> dict[str, float]:
    """How well the field's inverse (fixed-point iteration, as ``warp --inverse`` computes it) undoes it,
    at the moving points of the fixed voxels inside ``mask``: ``|v(y) + u(y + v(y))|`` with ``y = x + u(x)``.

    Returns the 50th, 99th and 99.9th percentiles and the maximum, in the field's unit and (``*_vox``) in
    field voxels (the mean spacing).
    """
    displacement = FieldDisplacement(np.asarray(field, np.float32), grid)
    points = grid.points()[np.asarray(mask, bool)]
    moved = points + np.moveaxis(np.asarray(field, np.float64), 0, -1)[np.asarray(mask, bool)]
    _, residual = invert_points(displacement, moved, iterations)
    length = np.linalg.norm(residual, axis=-1)
    voxel = float(grid.spacing.mean())
    out: dict[str, float] = {}
    for name, value in (
        ("p50", np.percentile(length, 50)),
        ("p99", np.percentile(length, 99)),
        ("p999", np.percentile(length, 99.9)),
        ("max", length.max()),
    ):
        out[name] = float(value)
        out[f"{name}_vox"] = float(value) / voxel
    return out


def rank_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson correlation of two ``(Z, Y, X)`` maps inside ``mask``."""
    x = np.asarray(a, np.float64)[np.asarray(mask, bool)]
    y = np.asarray(b, np.float64)[np.asarray(mask, bool)]
    return {
        "spearman": float(stats.spearmanr(x, y).statistic),
        "pearson": float(np.corrcoef(x, y)[0, 1]),
        "n": int(x.size),
    }
