"""``export-image`` of every data type an OME-Zarr image may hold, ``import-field`` against its fixed image (nibabel
only, no SimpleITK needed)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from patchmorph_core.errors import InputError
from patchmorph_core.spatial import Grid, nifti_affine
from pipeline.itk import export_field, import_field, nifti_image
from pipeline.ngff import write_field, write_image


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


def test_import_field_refuses_a_fixed_image_the_field_does_not_cover(tmp_path: Path) -> None:
    """An ITK field on a psl, anisotropic fixed grid (micrometres) imports with that fixed image (and with a copy
    moved by a fifth of its box); with a copy centred elsewhere, as ``--orientation`` makes it of a file whose origin
    is at a corner, the field covers a fraction of it (an eighth, and the export's margin): one sentence, no output."""
    grid = Grid.from_orientation((20, 16, 24), (50.0, 40.0, 45.0), "psl").translated(np.array([600.0, -300.0, 200.0]))
    values = np.zeros(grid.shape, np.float32)
    fixed = write_image(tmp_path / "fixed.ome.zarr", values, grid, n_levels=1)
    field_grid = grid.resampled(100.0)
    u = np.full((3, *field_grid.shape), 30.0, np.float32)
    field = write_field(tmp_path / "f.ome.zarr", u, field_grid, metadata={"fixed": str(fixed), "moving": str(fixed)})
    warp = export_field(field, tmp_path / "warp.nii.gz")
    assert grid.share_within(grid) == 1.0
    import_field(warp, tmp_path / "back.ome.zarr", fixed=fixed)
    near = write_image(tmp_path / "near.ome.zarr", values, grid.translated(grid.linear @ (np.asarray(grid.shape) / 5)), n_levels=1)
    import_field(warp, tmp_path / "near_field.ome.zarr", fixed=near)
    half = grid.translated(grid.linear @ (np.asarray(grid.shape) / 2))  # half the box along each axis: 1/8 shared
    far = write_image(tmp_path / "far.ome.zarr", values, half, n_levels=1)
    assert half.share_within(grid) == pytest.approx(0.125, abs=0.05)
    with pytest.raises(InputError, match=r"covers \d+% of the fixed image .* lie apart in the world"):
        import_field(warp, tmp_path / "far_field.ome.zarr", fixed=far)
    assert not (tmp_path / "far_field.ome.zarr").exists()


def test_a_sheared_grid_is_named_where_itk_cannot_read_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A NIfTI whose sform is sheared (axes 10° from right angles, anisotropic): its conversion warns that ITK and ANTs
    cannot read images or fields on its grid, export-image writes it for nibabel with that warning, and export-field
    refuses a field on it in one sentence, writing nothing."""
    import logging

    from patchmorph_core.spatial import grid_affine_from_ras
    from pipeline.importers import convert

    shear = np.array([[0.5, 0.25 * np.tan(np.radians(10)), 0, 4.0], [0, 0.25, 0, -3.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
    image = nib.Nifti1Image(np.random.default_rng(2).random((9, 14, 5)).astype(np.float32), shear)
    image.set_sform(shear, code=2)
    image.set_qform(None, code=0)
    nib.save(image, tmp_path / "sheared.nii.gz")
    grid = Grid((5, 14, 9), grid_affine_from_ras(shear), "millimeter")
    assert grid.shear_deg == pytest.approx(10.0, abs=1e-6)
    assert Grid.from_orientation((5, 14, 9), (2.0, 0.25, 0.5), "psl").shear_deg < 1e-6
    with caplog.at_level(logging.WARNING):
        converted = convert(tmp_path / "sheared.nii.gz", tmp_path / "sheared.ome.zarr")
        nifti_image(converted, tmp_path / "back.nii.gz")
    said = [r.getMessage() for r in caplog.records if "sheared grid" in r.getMessage()]
    assert len(said) == 2 and "export-field refuses" in said[0] and "ITK and ANTs refuse it" in said[1], said
    np.testing.assert_allclose(nib.load(tmp_path / "back.nii.gz").affine, shear, atol=1e-5)
    u = np.zeros((3, *grid.shape), np.float32)
    field = write_field(tmp_path / "f.ome.zarr", u, grid, metadata={"fixed": str(converted), "moving": str(converted)})
    with pytest.raises(InputError, match=r"lies on a sheared grid \(its axes 10° from right angles.*cannot read"):
        export_field(field, tmp_path / "warp.nii.gz")
    assert not (tmp_path / "warp.nii.gz").exists()


def test_export_image_never_leaves_a_half_written_file_nor_writes_through_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--overwrite`` of an earlier export by a write that dies part-way keeps the earlier file whole (it was
    truncated first, then half written); an output that is a symbolic link to another file (a source NIfTI) is
    replaced as a link, the file it points to kept."""
    grid = Grid.from_orientation((5, 6, 7), (50.0, 40.0, 30.0), "psl")
    values = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    image = write_image(tmp_path / "i.ome.zarr", values, grid, n_levels=1)
    out = nifti_image(image, tmp_path / "i.nii")
    before = out.read_bytes()

    def dies_half_way(img: nib.Nifti1Image, path: Path) -> None:
        Path(path).write_bytes(before[: len(before) // 2])
        raise OSError("killed")

    monkeypatch.setattr(nib, "save", dies_half_way)
    with pytest.raises(OSError, match="killed"):
        nifti_image(image, out, overwrite=True)
    monkeypatch.undo()
    assert out.read_bytes() == before
    source = tmp_path / "source.nii"
    source.write_bytes(b"the user's own file")
    link = tmp_path / "link.nii"
    link.symlink_to(source.name)
    nifti_image(image, link, overwrite=True)
    assert source.read_bytes() == b"the user's own file" and not link.is_symlink()
    np.testing.assert_array_equal(np.asarray(nib.load(link).dataobj).transpose(2, 1, 0), values)
