"""A bioformats2raw OME-Zarr store as that tool lays one out, written with ome-zarr-py (importable as
``bioformats_stores``: ``tests/`` is on the path through its conftest)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from ome_zarr.format import FormatV04
from ome_zarr.writer import write_image


def write_bioformats2raw(
    path: Path, series: Sequence[np.ndarray], voxel_size_um: tuple[float, float, float] = (50.0, 40.0, 40.0)
) -> Path:
    """Write ``path`` as bioformats2raw does: a top group with ``bioformats2raw.layout``, each image of ``series``
    (``(C, Z, Y, X)``) as the NGFF 0.4 image group ``<path>/<k>`` with axes ``c, z, y, x`` in micrometres
    (``voxel_size_um`` per z, y, x), and ``OME/`` listing the series. Returns ``path``."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    for k, data in enumerate(series):
        write_image(
            data, root.create_group(str(k)), scale_factors=[], fmt=FormatV04(), axes=["c", "z", "y", "x"],
            scale={"c": 1.0, **dict(zip("zyx", voxel_size_um, strict=True))},
            axes_units=dict.fromkeys("zyx", "micrometer"),
        )  # fmt: skip
    root.create_group("OME").attrs["series"] = [str(k) for k in range(len(series))]
    return path
