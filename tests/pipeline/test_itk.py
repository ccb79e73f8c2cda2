"""Fields for other tools: an exported field applied by SimpleITK reproduces ``warp``; ITK fields import back."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from patchmorph_core.errors import InputError
from patchmorph_core.metrics import ncc
from patchmorph_core.spatial import Grid, lps_to_world, nifti_affine, world_to_lps
from pipeline.itk import export_field, import_field, nifti_image, read_itk_field
from pipeline.ngff import read_field, read_image, write_field, write_image
from pipeline.warp import warp_files

sitk = pytest.importorskip("SimpleITK")


def _rotation(degrees: float, axis: int) -> np.ndarray:
    """4×4 rotation by ``degrees`` about world component ``axis``."""
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_rotvec(np.deg2rad(degrees) * np.eye(3)[axis]).as_matrix()
    return matrix


def _blobs(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(size=shape)
    return (1000 + 300 * ndimage.gaussian_filter(noise, 1.2) / 0.08).astype(np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A psl fixed image (micrometres, anisotropic), a rotated asr moving image with another spacing and
    a larger box, and a smooth field on a coarser grid of the fixed image's frame."""
    root = tmp_path_factory.mktemp("itk")
    fixed_grid = Grid.from_orientation((30, 26, 34), (50.0, 40.0, 45.0), "psl").translated(
        [120.0, -80.0, 40.0]
    )
    moving_grid = Grid.from_orientation((50, 46, 44), (45.0, 50.0, 55.0), "asr").transformed(
        _rotation(12.0, 0)
    )
    fixed = write_image(root / "fixed.ome.zarr", _blobs(fixed_grid.shape, 0), fixed_grid)
    moving = write_image(root / "moving.ome.zarr", _blobs(moving_grid.shape, 1), moving_grid)
    field_grid = fixed_grid.resampled(110.0)
    x = field_grid.points()
    u = np.stack(
        [
            120 * np.sin(x[..., 1] / 500.0),
            100 * np.cos(x[..., 2] / 450.0),
            90 * np.sin(x[..., 0] / 400.0 + 1.0),
        ]
    ).astype(np.float32)
    field = write_field(
        root / "field.ome.zarr", u, field_grid, metadata={"fixed": str(fixed), "moving": str(moving)}
    )
    return {"root": root, "fixed": fixed, "moving": moving, "field": field}


def _resample_with_sitk(moving: Path, reference: Path, displacement: Path) -> np.ndarray:
    image = sitk.ReadImage(str(moving), sitk.sitkFloat32)
    grid = sitk.ReadImage(str(reference), sitk.sitkFloat32)
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(displacement), sitk.sitkVectorFloat64))
    result = sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(result)  # (k, j, i) = our (z, y, x)


def test_lps_and_nifti_conventions() -> None:
    assert world_to_lps(np.array([1.0, 2.0, 3.0])).tolist() == [-3.0, -2.0, 1.0]  # (S, A, R) -> (L, P, S)
    np.testing.assert_allclose(
        lps_to_world(world_to_lps(np.arange(6.0).reshape(2, 3))), np.arange(6.0).reshape(2, 3)
    )
    grid = Grid.from_orientation((4, 5, 6), (2.0, 3.0, 4.0), "psl", unit="millimeter")
    affine = nifti_affine(grid)  # (i, j, k) = (x, y, z) -> RAS
    np.testing.assert_allclose(affine[:3, :3] @ [1, 0, 0], [4.0, 0, 0])  # x runs left -> right: +R
    np.testing.assert_allclose(affine[:3, :3] @ [0, 0, 1], [0, 2.0, 0])  # z runs posterior -> anterior: +A


def test_exported_field_applied_by_simpleitk_reproduces_warp(pair: dict[str, Path]) -> None:
    root = pair["root"]
    ours = warp_files(pair["field"], pair["moving"], root / "ours.ome.zarr", progress=False).out
    exported = export_field(pair["field"], root / "field.nii.gz")
    header = nib.load(str(exported)).header
    assert header.get_intent()[0] == "vector" and header.get_xyzt_units()[0] == "mm"
    field_shape = read_field(pair["field"])[1].shape
    assert nib.load(str(exported)).shape == (
        *(n + 2 for n in field_shape[::-1]),
        1,
        3,
    )  # one voxel more a side
    theirs = _resample_with_sitk(
        nifti_image(pair["moving"], root / "moving.nii.gz"),
        nifti_image(pair["fixed"], root / "fixed.nii.gz"),
        exported,
    )
    warped = np.asarray(read_image(ours).levels[0].array[...], dtype=np.float32)
    assert theirs.shape == warped.shape
    assert ncc(theirs, warped) >= 0.999
    # the field matters: without it the two disagree
    displacement = sitk.ReadImage(str(exported), sitk.sitkVectorFloat64)
    identity = sitk.Image(displacement.GetSize(), sitk.sitkVectorFloat64, 3)
    identity.CopyInformation(displacement)
    sitk.WriteImage(identity, str(root / "zero.nii.gz"))
    assert (
        ncc(_resample_with_sitk(root / "moving.nii.gz", root / "fixed.nii.gz", root / "zero.nii.gz"), warped)
        < 0.8
    )


def test_exported_inverse_field_reproduces_the_inverse_warp(pair: dict[str, Path]) -> None:
    root = pair["root"]
    ours = warp_files(
        pair["field"], pair["fixed"], root / "inverse.ome.zarr", inverse=True, progress=False
    ).out
    exported = export_field(pair["field"], root / "inverse.nii.gz", inverse=True)
    theirs = _resample_with_sitk(root / "fixed.nii.gz", root / "moving.nii.gz", exported)
    warped = np.asarray(read_image(ours).levels[0].array[...], dtype=np.float32)
    inside = warped > 0  # the fixed box seen from the moving grid
    assert ncc(theirs[inside], warped[inside]) >= 0.995


def test_imported_itk_field_warps_as_the_original(pair: dict[str, Path]) -> None:
    root = pair["root"]
    exported = root / "field.nii.gz"
    if not exported.exists():
        export_field(pair["field"], exported)
    values, grid = read_itk_field(exported)
    assert grid.unit == "millimeter" and values.shape == (
        3,
        *(n + 2 for n in read_field(pair["field"])[1].shape),
    )
    imported = import_field(exported, root / "imported.ome.zarr", fixed=pair["fixed"], moving=pair["moving"])
    again = warp_files(imported, pair["moving"], root / "again.ome.zarr", progress=False).out
    first = root / "ours.ome.zarr"
    if not first.exists():
        warp_files(pair["field"], pair["moving"], first, progress=False)
    a = np.asarray(read_image(again).levels[0].array[...], dtype=np.float32)
    b = np.asarray(read_image(first).levels[0].array[...], dtype=np.float32)
    assert ncc(a, b) >= 0.9999


def test_bad_field_files_are_one_sentence(tmp_path: Path, pair: dict[str, Path]) -> None:
    with pytest.raises(InputError, match=r"\.nii or \.nii\.gz"):
        export_field(pair["field"], tmp_path / "field.mha")
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    nib.save(image, tmp_path / "scalar.nii.gz")
    with pytest.raises(InputError, match=r"\(X, Y, Z, 1, 3\)"):
        read_itk_field(tmp_path / "scalar.nii.gz")


def test_inverse_of_a_field_imported_without_moving_names_the_option(pair: dict[str, Path]) -> None:
    root = pair["root"]
    exported = root / "field.nii.gz"
    if not exported.exists():
        export_field(pair["field"], exported)
    imported = import_field(exported, root / "imported_no_moving.ome.zarr", fixed=pair["fixed"])
    with pytest.raises(InputError, match=r"without --moving.*import it again with --moving"):
        export_field(imported, root / "inverse_no_moving.nii.gz", inverse=True)


# -- the field read with standard NGFF metadata alone ------------------------------------------------------------
_TOWARD = {
    "right": (1, 0, 0),
    "left": (-1, 0, 0),
    "anterior": (0, 1, 0),
    "posterior": (0, -1, 0),
    "superior": (0, 0, 1),
    "inferior": (0, 0, -1),
}
"""A reader's own frame (RAS, x y z): the unit vector an RFC-4 ``<from>-to-<to>`` axis runs toward."""


def _standard_index_to_ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """What a reader of the standard metadata alone (``attrs["ome"]``: scale, translation, RFC-4 orientation)
    makes of an image: its level-0 array and the 4×4 map from array index to its own RAS frame."""
    import zarr

    multiscale = dict(zarr.open_group(str(path), mode="r").attrs)["ome"]["multiscales"][0]
    axes = multiscale["axes"][-3:]
    transforms = {t["type"]: t[t["type"]] for t in multiscale["datasets"][0]["coordinateTransformations"]}
    scale, translation = np.array(transforms["scale"][-3:]), np.array(transforms["translation"][-3:])
    toward = np.array([_TOWARD[a["orientation"]["value"].split("-to-")[1]] for a in axes], dtype=np.float64).T
    matrix = np.eye(4)
    matrix[:3, :3] = toward * scale
    matrix[:3, 3] = toward @ translation
    array = np.asarray(zarr.open_group(str(path), mode="r")[multiscale["datasets"][0]["path"]][...])
    return array, matrix


def test_a_reader_of_the_standard_metadata_alone_warps_as_warp_does(tmp_path: Path) -> None:
    """Fixed psl, moving asr (another spacing and box), the field on a coarser grid of the fixed frame:
    points from scale/translation placed by each axis's RFC-4 orientation, displacements along the field's
    own axes: the reader's warp equals ours."""
    fixed_grid = Grid.from_orientation((20, 18, 22), (50.0, 40.0, 45.0), "psl").translated(
        [60.0, -40.0, 20.0]
    )
    moving_grid = Grid.from_orientation((30, 28, 26), (45.0, 50.0, 55.0), "asr")
    fixed = write_image(tmp_path / "fixed.ome.zarr", _blobs(fixed_grid.shape, 0), fixed_grid)
    moving = write_image(tmp_path / "moving.ome.zarr", _blobs(moving_grid.shape, 1), moving_grid)
    field_grid = fixed_grid.resampled(95.0)
    x = field_grid.points()
    u = np.stack(
        [90 * np.sin(x[..., 1] / 300.0), 70 * np.cos(x[..., 2] / 250.0), 60 * np.sin(x[..., 0] / 280.0)]
    )
    field = write_field(
        tmp_path / "field.ome.zarr", u.astype(np.float32), field_grid, metadata={"fixed": str(fixed)}
    )
    ours = np.asarray(
        read_image(warp_files(field, moving, tmp_path / "ours.ome.zarr", progress=False).out)
        .levels[0]
        .array[...]
    )

    fixed_arr, to_ras = _standard_index_to_ras(fixed)
    stored, field_to_ras = _standard_index_to_ras(field)
    moving_arr, moving_to_ras = _standard_index_to_ras(moving)
    index = np.indices(fixed_arr.shape).reshape(3, -1).astype(np.float64)
    ras = to_ras[:3, :3] @ index + to_ras[:3, 3:]
    at = np.linalg.inv(field_to_ras)[:3] @ np.vstack([ras, np.ones(ras.shape[1])])
    at = np.clip(
        at, 0, np.array(stored.shape[1:])[:, None] - 1
    )  # the field extends constantly outside its grid
    along_axes = np.stack([ndimage.map_coordinates(stored[k], at, order=1) for k in range(3)])
    spacing = np.linalg.norm(field_to_ras[:3, :3], axis=0)
    displacement = (field_to_ras[:3, :3] / spacing) @ along_axes  # the field's axes -> the reader's RAS
    target = np.linalg.inv(moving_to_ras)[:3] @ np.vstack([ras + displacement, np.ones(ras.shape[1])])
    theirs = ndimage.map_coordinates(moving_arr.astype(np.float32), target, order=1).reshape(fixed_arr.shape)
    assert ncc(theirs, ours) >= 0.999
    assert ncc(np.flip(theirs, 0), ours) < 0.9


def test_export_image_writes_a_level_that_simpleitk_places_as_we_do(tmp_path: Path) -> None:
    """``patchmorph export-image --level 1`` of an anisotropic, rotated image: SimpleITK's physical point of a
    voxel is our world point of it (in LPS, mm); a level that does not exist is one sentence."""
    from typer.testing import CliRunner

    from patchmorph.cli import app

    direction = _rotation(20.0, 1)[:3, :3]
    grid = Grid.from_spacing((20, 24, 28), (0.3, 0.2, 0.25), origin=(4.0, -3.0, 2.0), unit="millimeter",
                             direction=direction)  # fmt: skip
    image = write_image(tmp_path / "i.ome.zarr", _blobs(grid.shape, 3), grid, n_levels=2)
    result = CliRunner().invoke(app, ["export-image", str(image), str(tmp_path / "i.nii.gz"), "--level", "1"])
    assert result.exit_code == 0, result.output
    level = read_image(image).levels[1]
    theirs = sitk.ReadImage(str(tmp_path / "i.nii.gz"))
    assert theirs.GetSize() == level.grid.shape[::-1]
    for index in [(0, 0, 0), (3, 5, 7), (9, 11, 13)]:
        physical = np.array(theirs.TransformIndexToPhysicalPoint(tuple(int(i) for i in index[::-1])))
        np.testing.assert_allclose(physical, world_to_lps(level.grid.index_to_world(np.array(index, float))), atol=1e-4)
    values = sitk.GetArrayFromImage(theirs)  # (z, y, x) as ours
    np.testing.assert_allclose(values, np.asarray(level.array[...]), rtol=1e-6)
    result = CliRunner().invoke(app, ["export-image", str(image), str(tmp_path / "j.nii.gz"), "--level", "5"])
    assert result.exit_code == 2 and "has levels 0 to 1, not 5" in result.output
