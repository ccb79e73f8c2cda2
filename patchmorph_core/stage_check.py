"""Never worse than the start: the contrast-robust similarity before and after each deformable pass.

A network pass (or the polish) that lowers the similarity of the fixed image and the warped moving image is
rejected: the registration goes on from the field it had before that pass (issue 25.3). The similarity is
:class:`~patchmorph_core.similarity.MindSSC` (it does not assume the two contrasts are related, so a pass that
fits one contrast's intensities onto the other's does not score as an improvement), averaged over the fixed
tissue on one *check grid*: the registration's output field grid coarsened to at most :data:`CHECK_VOXELS`
voxels over the same box. One grid for every pass makes the figures comparable from pass to pass, and the
score after pass ``n`` is the score before pass ``n + 1``; each score samples both images at the check grid's
points once (about 0.1 s), whatever the image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from patchmorph_core.alignment import one_torch_thread
from patchmorph_core.displacement import Displacement
from patchmorph_core.sampling import normalize
from patchmorph_core.similarity import MindSSC, Similarity
from patchmorph_core.source import MultiscaleImage, downsampled_grid
from patchmorph_core.spatial import Grid

CHECK_VOXELS = 40**3
"""Most voxels of the check grid."""

TOLERANCE = 1e-5
"""A pass is rejected when it lowers the mean similarity by more than this (MIND values lie in ``[−1, 0]``; a
field that reproduces its prior on another grid scores equal to about 1e-10)."""

TISSUE_LEVEL = 0.1
"""Fixed voxels at or above this normalised intensity (0..1) count as tissue."""


def check_grid(grid: Grid, max_voxels: int = CHECK_VOXELS) -> Grid:
    """``grid`` coarsened by one integer factor per axis (the same on every axis) to at most ``max_voxels``."""
    voxels = int(np.prod(grid.shape))
    factor = max(1, math.ceil((voxels / max_voxels) ** (1.0 / 3.0)))
    while int(np.prod([math.ceil(n / factor) for n in grid.shape])) > max_voxels:
        factor += 1
    shape = tuple(max(1, n // factor) for n in grid.shape)
    return downsampled_grid(grid, (factor,) * 3, shape)


@dataclass(frozen=True)
class StageScorer:
    """Scores displacements by the mean similarity inside the fixed tissue on a check grid.

    Attributes:
        grid: the check grid (:func:`check_grid`).
        fixed: ``(Z, Y, X)`` the fixed image on ``grid``, normalised 0..1.
        moving: the moving pyramid (in ``grid.unit``).
        moving_range: the moving image's intensity range ``(lo, hi)``.
        tissue: ``(Z, Y, X)`` bool, fixed voxels counted.
        similarity: the similarity (default :class:`MindSSC`).
    """

    grid: Grid
    fixed: np.ndarray
    moving: MultiscaleImage
    moving_range: tuple[float, float]
    tissue: np.ndarray
    similarity: Similarity

    @classmethod
    def build(
        cls,
        fixed: MultiscaleImage,
        moving: MultiscaleImage,
        ranges: tuple[tuple[float, float], tuple[float, float]],
        field_grid: Grid,
        similarity: Similarity | None = None,
    ) -> StageScorer:
        """The scorer on the check grid of ``field_grid``; ``ranges`` are the fixed and moving intensity ranges."""
        grid = check_grid(field_grid)
        spacing = float(grid.spacing.max())
        values = normalize(fixed.sample(grid.points(), spacing), *ranges[0])
        tissue = values >= TISSUE_LEVEL
        return cls(grid, values, moving, ranges[1], tissue, similarity or MindSSC())

    def score(self, displacement: Displacement) -> float:
        """Mean per-voxel similarity inside the fixed tissue with the moving image warped by ``displacement``
        (higher is better; NaN when the check grid holds no tissue).

        The similarity runs on one torch thread: the check grid is small, and on a loaded machine the many short
        parallel regions of two threads wait for each other longer than one thread takes (the same scores in
        every process, too, whatever its thread count)."""
        if not self.tissue.any():
            return math.nan
        points = self.grid.points()
        moved = points + displacement(points.reshape(-1, 3)).reshape(points.shape)
        warped = normalize(self.moving.sample(moved, float(self.grid.spacing.max())), *self.moving_range)
        with torch.no_grad(), one_torch_thread():
            values = self.similarity.voxel_map(
                torch.from_numpy(self.fixed)[None, None], torch.from_numpy(warped)[None, None]
            )[0, 0].numpy()
        return float(values[self.tissue].mean())


@dataclass(frozen=True)
class StageCheck:
    """The similarity before and after one pass, and whether the pass was kept."""

    before: float
    after: float

    @property
    def accepted(self) -> bool:
        """Kept unless the similarity fell by more than :data:`TOLERANCE` (a NaN score, no tissue on the check
        grid, keeps the pass)."""
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
