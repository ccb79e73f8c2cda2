"""``export-image`` of every data type an OME-Zarr image may hold (read back with nibabel, no SimpleITK needed)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from patchmorph_core.spatial import Grid, nifti_affine
from pipeline.itk import nifti_image
from pipeline.ngff import write_image


@pytest.mark.parametrize(
    ("dtype", "written"),
    [("int64", "int64"), ("uint64", "uint64"), ("float16", "float32"), ("bool", "uint8"), ("int8", "int8")],
)
def test_export_image_writes_every_dtype(tmp_path: Path, dtype: str, written: str) -> None:
    """int64 labels (numpy's default integer), uint64, float16 and boolean masks: written with their values and
    the grid (an anisotropic psl grid), not a traceback."""
    grid = Grid.from_orientation((5, 6, 7), (50.0, 40.0, 30.0), "psl")
    values = (np.arange(5 * 6 * 7).reshape(5, 6, 7) % 3).astype(dtype)
    image = write_image(tmp_path / "i.ome.zarr", values, grid, n_levels=1)
    out = nifti_image(image, tmp_path / "i.nii.gz")
    theirs = nib.load(out)
    assert theirs.get_data_dtype() == np.dtype(written)
    np.testing.assert_array_equal(np.asarray(theirs.dataobj).transpose(2, 1, 0), values.astype(written))
    np.testing.assert_allclose(theirs.affine, nifti_affine(grid.with_unit("millimeter")), atol=1e-6)
