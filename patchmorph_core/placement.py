"""Placement of a slab along one axis of a whole image: which window of the moving image (an atlas) holds what
the fixed image (a slab or block of brain) holds?

A slab registered against the whole atlas gets the whole atlas squeezed into it; registered against its own part
of the atlas it fits far better (``--atlas-range``). When that part is not known, it is searched for here. Each
window of ``width`` voxels along the moving image's array ``axis`` stands for the moving image with everything
outside it set to 0 (the cut the job then makes). It is scored against the fixed image with the orientation
check's machinery (:mod:`patchmorph_core.orientation`):

* the initial alignment's objective on one coarse level (:meth:`~patchmorph_core.alignment.FitLevel.similarity`,
  the MIND-SSC *dissimilarity*, lower is better);
* after the same short affine fit (:func:`~patchmorph_core.orientation.refined_dissimilarity`) from the tissue
  centres matched (the moving centre: that of the cut image, as the job's initial alignment takes it).

The window of lowest dissimilarity wins. Windows are scored every ``width /`` :data:`COARSE_STRIDES` voxels, then
every voxel around the best of those. The fixed level and its descriptors are built once; a window only masks the
moving level's tensor, so a search costs about one short fit per window (times in ``docs/checks.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from patchmorph_core.alignment import LEVELS, FitLevel, one_torch_thread
from patchmorph_core.orientation import refined_dissimilarity
from patchmorph_core.sampling import tissue_bounds, tissue_center
from patchmorph_core.source import Level, MultiscaleImage

FIT_LEVEL = LEVELS[0]
"""The search's fit spacing, as the fraction ``E / n`` of the fixed tissue extent ``E`` (the initial alignment's
first level, :data:`~patchmorph_core.alignment.LEVELS`, as the orientation check's)."""

COARSE_STRIDES = 4
"""The first pass scores windows every ``width / COARSE_STRIDES`` voxels (at least 1); the second every voxel
within one such stride of the first pass's best."""


@dataclass(frozen=True)
class WindowScore:
    """One window: moving array indices ``start .. start + width - 1`` along the axis, its dissimilarity."""

    start: int
    dissimilarity: float


@dataclass(frozen=True)
class WindowSearch:
    """The scores of every window (in order of ``start``), the best one and the wall time in s."""

    windows: tuple[WindowScore, ...]
    width: int
    seconds: float

    @property
    def best(self) -> WindowScore:
        """The window of lowest dissimilarity (the first of equal ones)."""
        return min(self.windows, key=lambda w: w.dissimilarity)


def search_windows(fixed: MultiscaleImage, moving: MultiscaleImage, axis: int, width: int) -> WindowSearch:
    """Score the windows of ``width`` voxels along array ``axis`` of ``moving``'s single level (see the module
    docstring): every ``width /`` :data:`COARSE_STRIDES` voxels, then every voxel around the best of those.

    Runs on one CPU thread (as :func:`~patchmorph_core.alignment.fit_affine`): the same inputs give the same
    scores in every process, so a rerun finds the same window.

    Args:
        fixed: the slab (any pyramid).
        moving: the whole atlas as one level (its coarse copy), in the fixed image's unit.
        axis: the moving array axis to search along (0, 1 or 2).
        width: window width in voxels of that level (at least 1, at most the axis's length).
    """
    with one_torch_thread():
        return _search_windows(fixed, moving, axis, width)


def _search_windows(fixed: MultiscaleImage, moving: MultiscaleImage, axis: int, width: int) -> WindowSearch:
    tic = time.perf_counter()
    level_in = moving.levels[0]
    length = level_in.grid.shape[axis]
    width = int(min(max(width, 1), length))
    low, high = tissue_bounds(fixed)
    extent = float(np.max(high - low))
    level = FitLevel.build(fixed, MultiscaleImage((level_in,), moving.name), extent / FIT_LEVEL)
    centre_f = torch.as_tensor(tissue_center(fixed), dtype=torch.float32)
    values = np.asarray(level_in.array, dtype=np.float32)

    def score(start: int) -> WindowScore:
        kept = [slice(None)] * 3
        kept[axis] = slice(start, start + width)
        masked, volume = np.zeros_like(values), torch.zeros_like(level.volume)
        masked[tuple(kept)] = values[tuple(kept)]
        volume[(0, 0, *kept)] = level.volume[(0, 0, *kept)]
        window = MultiscaleImage((Level(masked, level_in.grid),), moving.name)  # as the job's cut atlas
        centre_m = torch.as_tensor(tissue_center(window), dtype=torch.float32)
        return WindowScore(
            start, refined_dissimilarity(replace(level, volume=volume), centre_f, centre_m, extent, np.eye(3))
        )

    stride, last = max(width // COARSE_STRIDES, 1), length - width
    scores = {start: score(start) for start in sorted({*range(0, last + 1, stride), last})}
    best = min(scores.values(), key=lambda w: w.dissimilarity).start
    for start in range(max(best - stride + 1, 0), min(best + stride, last + 1)):
        if start not in scores:
            scores[start] = score(start)
    return WindowSearch(tuple(scores[k] for k in sorted(scores)), width, time.perf_counter() - tic)
