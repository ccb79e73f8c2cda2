"""Never worse than the start: the contrast-robust similarity before and after each deformable pass.

A network pass (or the polish) that lowers the similarity of the fixed image and the warped moving image is
rejected: the registration goes on from the field it had before that pass (issue 25.3). The similarity is
:class:`~patchmorph_core.similarity.MindSSC` (it does not assume the two contrasts are related, so a pass that
fits one contrast's intensities onto the other's does not score as an improvement), averaged over the fixed
tissue of a *check sample* of the pass's own field grid (:func:`check_boxes`): the whole grid when it is small,
else boxes of that grid's voxels spread evenly over it. Each pass is scored at its own resolution, so a pass
whose work lies at the scale of a few field voxels (the polish of a fine field) is seen; a coarse copy of the
grid would smooth that work away. Passes on one grid (the finest pass and the polish, refinement passes) share
the sample, so the score after one is the score before the next; a pass on a new grid scores its start there
first. A score samples both images and the field at the sample's points: on a large grid box by box, each box
reading only its own part of them, so its cost is bounded by :data:`CHECK_VOXELS` whatever the image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from patchmorph_core.alignment import one_torch_thread
from patchmorph_core.displacement import Displacement
from patchmorph_core.sampling import normalize
from patchmorph_core.similarity import MindSSC, Similarity
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid

CHECK_VOXELS = 40**3
"""Most voxels one check samples."""

CHECK_BOX = 12
"""Edge (voxels of the pass's field grid) of the boxes a check samples on a grid of more than
:data:`CHECK_VOXELS` voxels; many small boxes spread the sample over the brain."""

ONE_READ_VOXELS = 2**22
"""A field grid of at most this many voxels is checked with one read of each image and field for all boxes
(their level then spans at most a few tens of MB); a larger one box by box, each box reading its own part."""

TOLERANCE = 1e-5
"""A pass is rejected when it lowers the mean similarity by more than this (MIND values lie in ``[−1, 0]``; a
field that reproduces its prior on another grid scores equal to about 1e-10)."""

TISSUE_LEVEL = 0.1
"""Fixed voxels at or above this normalised intensity (0..1) count as tissue."""


def _box_starts(n: int, edge: int, count: int) -> list[int]:
    """``count`` start indices of boxes of ``edge`` voxels along an axis of ``n`` voxels, evenly from the first
    voxel to the last box that fits."""
    if count == 1:
        return [(n - edge) // 2]
    return [round(i * (n - edge) / (count - 1)) for i in range(count)]


def check_boxes(grid: Grid, max_voxels: int = CHECK_VOXELS, box: int = CHECK_BOX) -> list[Grid]:
    """The sub-grids of ``grid`` (its voxels and spacing) a check scores: ``[grid]`` when it has at most
    ``max_voxels`` voxels, else boxes of ``box`` voxels per axis (the axis's length where it is shorter), one
    per cell of a regular tiling of the grid by cubes of ``cell`` voxels, the smallest cell that keeps the
    boxes within ``max_voxels`` voxels; along each axis the boxes are spread evenly from edge to edge. All
    boxes have one shape."""
    shape = np.asarray(grid.shape, dtype=np.int64)
    if int(np.prod(shape)) <= max_voxels:
        return [grid]
    edge = np.minimum(box, shape)
    most = np.maximum(shape // edge, 1)  # boxes that fit side by side along each axis

    def counts(cell: int) -> np.ndarray:
        return np.clip(-(-shape // cell), 1, most)

    cell = max(box, math.floor(box * (int(np.prod(shape)) / max_voxels) ** (1.0 / 3.0)))
    while int(np.prod(counts(cell))) * int(np.prod(edge)) > max_voxels:
        cell += 1
    starts = [_box_starts(int(n), int(e), int(c)) for n, e, c in zip(shape, edge, counts(cell), strict=True)]
    return [
        grid.crop((z, y, x), (z + int(edge[0]), y + int(edge[1]), x + int(edge[2])))
        for z in starts[0]
        for y in starts[1]
        for x in starts[2]
    ]


def _box_by_box(values: Callable[[np.ndarray], np.ndarray], points: np.ndarray, one_read: bool) -> np.ndarray:
    """``values`` of the ``(N, Z, Y, X, 3)`` world ``points`` of ``N`` boxes: one call for all of them with
    ``one_read``, else one call per box (each reads only its own part of an image or a lazily read field)."""
    return values(points) if one_read else np.stack([values(box) for box in points])


@dataclass(frozen=True)
class StageScorer:
    """Scores displacements by the mean similarity inside the fixed tissue of a check sample.

    Attributes:
        grid: the field grid checked.
        points: ``(N, Z, Y, X, 3)`` world points of its check sample's ``N`` boxes (:func:`check_boxes`).
        fixed: ``(N, Z, Y, X)`` the fixed image at ``points``, normalised 0..1.
        moving: the moving pyramid (in ``grid.unit``).
        moving_range: the moving image's intensity range ``(lo, hi)``.
        tissue: ``(N, Z, Y, X)`` bool, fixed voxels counted.
        similarity: the similarity (default :class:`MindSSC`).
        one_read: read each image and field once for all boxes (a grid of at most :data:`ONE_READ_VOXELS`
            voxels), else box by box.
    """

    grid: Grid
    points: np.ndarray
    fixed: np.ndarray
    moving: MultiscaleImage
    moving_range: tuple[float, float]
    tissue: np.ndarray
    similarity: Similarity
    one_read: bool

    @classmethod
    def build(
        cls,
        fixed: MultiscaleImage,
        moving: MultiscaleImage,
        ranges: tuple[tuple[float, float], tuple[float, float]],
        field_grid: Grid,
        similarity: Similarity | None = None,
    ) -> StageScorer:
        """The scorer on the check sample of ``field_grid``; ``ranges`` are the fixed and moving intensity
        ranges."""
        points = np.stack([box.points() for box in check_boxes(field_grid)])
        one_read = int(np.prod(field_grid.shape)) <= ONE_READ_VOXELS
        spacing = float(field_grid.spacing.max())
        values = normalize(_box_by_box(lambda p: fixed.sample(p, spacing), points, one_read), *ranges[0])
        tissue = values >= TISSUE_LEVEL
        return cls(field_grid, points, values, moving, ranges[1], tissue, similarity or MindSSC(), one_read)

    def score(self, displacement: Displacement) -> float:
        """Mean per-voxel similarity inside the fixed tissue with the moving image warped by ``displacement``
        (higher is better; NaN when the check sample holds no tissue).

        The similarity runs on one torch thread: the sample is small, and on a loaded machine the many short
        parallel regions of two threads wait for each other longer than one thread takes (the same scores in
        every process, too, whatever its thread count)."""
        if not self.tissue.any():
            return math.nan
        spacing = float(self.grid.spacing.max())

        def warped(points: np.ndarray) -> np.ndarray:
            moved = points + displacement(points.reshape(-1, 3)).reshape(points.shape)
            return self.moving.sample(moved, spacing)

        values = normalize(_box_by_box(warped, self.points, self.one_read), *self.moving_range)
        with torch.no_grad(), one_torch_thread():
            similarity = self.similarity.voxel_map(
                torch.from_numpy(self.fixed)[:, None], torch.from_numpy(values)[:, None]
            )[:, 0].numpy()
        return float(similarity[self.tissue].mean())


@dataclass(frozen=True)
class StageCheck:
    """The similarity before and after one pass, and whether the pass was kept."""

    before: float
    after: float

    @property
    def accepted(self) -> bool:
        """Kept unless the similarity fell by more than :data:`TOLERANCE` (a NaN score, no tissue in the check
        sample, keeps the pass)."""
        return not self.after < self.before - TOLERANCE

    def record(self) -> dict[str, float | bool | str]:
        """The figures for a pass's record: ``similarity_before``, ``similarity_after``, ``accepted`` and the
        similarity's name."""
        return {
            "similarity": "mind",
            "similarity_before": self.before,
            "similarity_after": self.after,
            "accepted": self.accepted,
        }


class PassChecks:
    """The stage check of a registration's passes, in order: each pass is scored on its field grid's check
    sample; the score of the field a pass starts from is the previous pass's score after when the two share a
    grid, else it is scored on the new grid first.

    Args:
        fixed: the fixed pyramid.
        moving: the moving pyramid (in the fixed image's unit).
        ranges: the fixed and moving intensity ranges.
    """

    def __init__(
        self,
        fixed: MultiscaleImage,
        moving: MultiscaleImage,
        ranges: tuple[tuple[float, float], tuple[float, float]],
    ) -> None:
        self.fixed, self.moving, self.ranges = fixed, moving, ranges
        self._scorer: StageScorer | None = None
        self._score = math.nan

    def check(self, grid: Grid, start: Displacement, candidate: Displacement) -> StageCheck:
        """Score ``candidate`` (a pass's field on ``grid``) against ``start`` (the field the pass started from:
        the last kept candidate, or the registration's start). A kept candidate is the next pass's start."""
        if self._scorer is None or not self._scorer.grid.same_voxels(grid):
            self._scorer = StageScorer.build(self.fixed, self.moving, self.ranges, grid)
            self._score = self._scorer.score(start)
        check = StageCheck(self._score, self._scorer.score(candidate))
        if check.accepted:
            self._score = check.after
        return check
