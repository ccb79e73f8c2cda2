"""The slab search (:mod:`patchmorph_core.placement`): a slab cut from a synthetic whole image is found where it was
cut, whatever grid it is sampled on."""

from __future__ import annotations

import numpy as np

from patchmorph_core.placement import search_windows
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid

BLOBS = np.random.default_rng(3).uniform([-8.0, -20.0, -7.0], [8.0, 20.0, 7.0], size=(12, 3))
"""Inner structures (mm) spread along the long axis (world component 1), so that every part of it looks different."""


def _object(points_mm: np.ndarray) -> np.ndarray:
    """An elongated brain-like object in world space (mm): ellipsoid of semi-axes 10, 24, 9 with twelve blobs."""
    r = np.sqrt(((points_mm / np.array([10.0, 24.0, 9.0])) ** 2).sum(-1))
    value = np.clip(1.5 - 1.5 * r, 0.0, 1.0) * 60.0
    for k, centre in enumerate(BLOBS):
        value += (20.0 + 7.0 * k) * np.exp(-(((points_mm - centre) / 2.0) ** 2).sum(-1))
    return value.astype(np.float32)


def test_a_slab_is_found_where_it_was_cut() -> None:
    """The whole object on a 1 mm grid in µm; the slab world y in [2, 10) mm sampled on an anisotropic, non-cubic grid
    in millimetres, centred on its own world origin (as a brain's grid from an orientation code is): the best 8-voxel
    window along the whole image's axis 1 starts at the slab's edge, voxel 27 (y = 2 mm), within one voxel."""
    whole_grid = Grid.from_spacing((24, 52, 22), (1000.0, 1000.0, 1000.0), origin=(-11500.0, -25000.0, -10500.0))
    whole = MultiscaleImage.from_array(_object(whole_grid.with_unit("millimeter").points()), whole_grid, n_levels=1)
    slab_grid = Grid.from_spacing((60, 20, 45), (0.4, 0.4, 0.5), origin=(-11.8, 2.2, -11.0), unit="millimeter")
    values = _object(slab_grid.points())
    centred = slab_grid.translated(-slab_grid.center)
    slab = MultiscaleImage.from_array(values, centred, n_levels=3)
    found = search_windows(slab, whole.with_unit("millimeter"), axis=1, width=8)
    assert abs(found.best.start - 27) <= 1, [(w.start, round(w.dissimilarity, 4)) for w in found.windows]
    assert found.width == 8 and len(found.windows) < 52 - 8 + 1  # a coarse pass, then the best's neighbours
