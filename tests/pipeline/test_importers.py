"""Importers: NIfTI / NRRD headers mapped to (z, y, x) arrays and RAS+ (S, A, R) grids."""

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from patchmorph_core.errors import InputError
from patchmorph_core.spatial import parse_length
from pipeline.importers import load_nifti, load_nrrd, normalize_unit
from pipeline.itk import read_itk_field

REPO = Path(__file__).resolve().parents[2]


def _volume() -> np.ndarray:
    return np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # file axes (i, j, k)


def test_load_nifti_reverses_axes_and_maps_world(tmp_path: Path) -> None:
    data = _volume()
    affine = np.array([[0.0, 0, -2.0, 5], [1.5, 0, 0, -3], [0, 0.5, 0, 7], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("micron")
    nib.save(img, tmp_path / "a.nii.gz")
    array, grid = load_nifti(tmp_path / "a.nii.gz")
    assert array.shape == (6, 5, 4) and grid.shape == (6, 5, 4) and grid.unit == "micrometer"
    for i, j, k in [(0, 0, 0), (3, 1, 5), (2, 4, 1)]:
        assert array[k, j, i] == data[i, j, k]
        r, a, s = affine[:3, :3] @ [i, j, k] + affine[:3, 3]
        np.testing.assert_allclose(grid.index_to_world([k, j, i]), [s, a, r])


def test_load_nifti_default_unit_and_overrides(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(_volume(), np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "b.nii")
    _, grid = load_nifti(tmp_path / "b.nii")
    assert grid.unit == "millimeter"
    _, grid2 = load_nifti(tmp_path / "b.nii", voxel_size=(1, 2, 3), unit="um")
    np.testing.assert_allclose(grid2.spacing, [1, 2, 3])
    assert grid2.unit == "micrometer"
    _, grid3 = load_nifti(tmp_path / "b.nii", orientation="asr")
    np.testing.assert_allclose(grid3.direction, [[0, -1, 0], [-1, 0, 0], [0, 0, -1]])
    np.testing.assert_allclose(grid3.center, 0, atol=1e-9)


def test_load_nrrd_lps_header(tmp_path: Path) -> None:
    data = _volume()
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([2.0, 3.0, 4.0]),
        "space origin": np.array([1.0, 2.0, 3.0]),
        "space units": ["mm", "mm", "mm"],
    }
    nrrd.write(str(tmp_path / "c.nrrd"), data, header, index_order="F")
    array, grid = load_nrrd(tmp_path / "c.nrrd")
    assert array.shape == (6, 5, 4) and grid.unit == "millimeter"
    for i, j, k in [(0, 0, 0), (3, 1, 5)]:
        assert array[k, j, i] == data[i, j, k]
        left, post, sup = 1 + 2 * i, 2 + 3 * j, 3 + 4 * k
        np.testing.assert_allclose(grid.index_to_world([k, j, i]), [sup, -post, -left])


def test_load_nrrd_allen_template_is_micrometer() -> None:
    array, grid = load_nrrd(REPO / "examples" / "mouse_ccf" / "average_template_100.nrrd")
    assert array.shape == (114, 80, 132)
    assert grid.unit == "micrometer"
    np.testing.assert_allclose(grid.spacing, [100, 100, 100])


def test_load_synthseg_nifti_is_ras() -> None:
    # SynthSeg subject 01 at 2 mm, stored LIA (x: R->L, y: S->I, z: P->A; tests/data/PROVENANCE.md)
    array, grid = load_nifti(REPO / "tests" / "data" / "synthseg_01_2mm.nii.gz")
    assert array.shape == (113, 115, 79) and grid.unit == "millimeter"  # file axes (i, j, k) reversed
    # every direction column is a signed 2 mm axis vector: (k, j, i) -> (S, A, R) = (A, -S, -R)
    np.testing.assert_allclose(grid.linear, [[0, -2, 0], [2, 0, 0], [0, 0, -2]], atol=1e-6)


@pytest.mark.parametrize("loader", [load_nifti, load_nrrd])
def test_missing_and_bad_files(tmp_path: Path, loader) -> None:
    with pytest.raises(InputError, match="does not exist"):
        loader(tmp_path / "nope")
    (tmp_path / "junk").write_text("not an image")
    with pytest.raises(InputError, match="not a readable"):
        loader(tmp_path / "junk")


def _two_forms(data: np.ndarray, qform: np.ndarray, sform: np.ndarray, codes: tuple[int, int]) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, sform)
    img.set_sform(sform, code=codes[1])
    img.set_qform(qform, code=codes[0])
    img.header.set_xyzt_units("mm")
    return img


def test_nifti_whose_qform_and_sform_disagree_is_refused(tmp_path: Path) -> None:
    """A rotated, anisotropic header whose qform lies 2 mm from its sform (ITK would read the qform, nibabel the
    sform): one sentence, for an image and for an ITK field; equal forms, or one form unset, pass; --orientation
    replaces both."""
    sform = np.array([[0.0, 0.0, -2.0, 5.0], [1.5, 0.0, 0.0, -3.0], [0.0, 0.5, 0.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
    qform = sform.copy()
    qform[:3, 3] += [0.0, 2.0, 0.0]
    nib.save(_two_forms(_volume(), qform, sform, (1, 2)), tmp_path / "two.nii.gz")
    with pytest.raises(InputError, match=r"qform and an sform that place its voxels up to 4 voxels apart"):
        load_nifti(tmp_path / "two.nii.gz")
    _, grid = load_nifti(tmp_path / "two.nii.gz", orientation="asr")
    assert grid.shape == (6, 5, 4)
    for codes in [(0, 2), (1, 0)]:
        nib.save(_two_forms(_volume(), qform, sform, codes), tmp_path / "one.nii.gz")
        load_nifti(tmp_path / "one.nii.gz")
    nib.save(_two_forms(_volume(), sform, sform, (1, 2)), tmp_path / "same.nii.gz")
    load_nifti(tmp_path / "same.nii.gz")
    field = np.zeros((4, 5, 6, 1, 3), np.float32)
    nib.save(_two_forms(field, qform, sform, (1, 1)), tmp_path / "warp.nii.gz")
    with pytest.raises(InputError, match=r"qform and an sform .* fslorient"):
        read_itk_field(tmp_path / "warp.nii.gz")


@pytest.mark.parametrize(
    ("spelling", "unit"),
    [("µm", "micrometer"), ("\u03bcm", "micrometer"), ("micrometre", "micrometer"), (" MM ", "millimeter"),
     ("nanometres", "nanometer")],
)
def test_unit_spellings_are_those_lengths_take(spelling: str, unit: str) -> None:
    """``--unit`` takes every spelling a length such as ``--field-spacing 50 μm`` takes (the Greek mu too)."""
    assert normalize_unit(spelling) == unit == parse_length(f"50 {spelling.strip()}")[1]
    with pytest.raises(InputError, match="unknown unit 'furlong'"):
        normalize_unit("furlong")


def test_a_tiff_without_voxel_size_names_the_option_and_the_manifest_field(tmp_path: Path) -> None:
    """A batch's user cannot pass ``--voxel-size``: the refusal names the manifest item's field too."""
    import tifffile

    from pipeline.importers import open_input

    tifffile.imwrite(tmp_path / "brain.tif", np.zeros((4, 5, 6), np.uint16))
    with pytest.raises(InputError, match=r"pass --voxel-size Z Y X .*in a batch, the manifest item's voxel_size"):
        open_input(tmp_path / "brain.tif")


def test_a_pyramidal_ome_tiff_is_read_at_its_full_resolution(tmp_path: Path) -> None:
    """An OME-TIFF with its coarser levels in SubIFDs (as tifffile, QuPath or bfconvert write one) reads as its
    level 0, not as an unreadable file."""
    import tifffile

    from pipeline.importers import open_input

    stack = np.random.default_rng(0).integers(0, 60000, (5, 16, 24), dtype=np.uint16)
    with tifffile.TiffWriter(tmp_path / "brain.ome.tif") as tif:
        tif.write(stack, subifds=1, metadata={"axes": "ZYX"}, tile=(16, 16))
        tif.write(stack[:, ::2, ::2], subfiletype=1, tile=(16, 16))
    array, grid, kind = open_input(tmp_path / "brain.ome.tif", voxel_size=(5.0, 2.0, 1.0))
    assert kind == "tiff-stack" and grid.shape == (5, 16, 24)
    np.testing.assert_array_equal(np.asarray(array), stack)


def test_a_tiff_that_states_its_voxel_size_is_refused_naming_it(tmp_path: Path, caplog) -> None:
    """An ImageJ or OME-TIFF states a voxel size, which PatchMorph does not take: the refusal gives the user the
    option that says it (Z Y X, in the metadata's unit), and an option that disagrees with it is warned about, once."""
    import tifffile

    from pipeline.importers import convert, open_input

    stack = np.random.default_rng(0).integers(0, 60000, (5, 16, 24), dtype=np.uint16)
    tifffile.imwrite(
        tmp_path / "ij.tif", stack, imagej=True, resolution=(1 / 2.0, 1 / 1.5), metadata={"spacing": 5.0, "unit": "um"}
    )  # resolution: (x, y) pixels per unit
    ome = {"axes": "ZYX", "PhysicalSizeZ": 0.05, "PhysicalSizeY": 0.004, "PhysicalSizeX": 0.002}
    tifffile.imwrite(tmp_path / "brain.ome.tif", stack, ome=True, metadata={**ome, **{
        f"PhysicalSize{a}Unit": "mm" for a in "ZYX"}})  # fmt: skip
    with pytest.raises(InputError, match=r"ImageJ metadata says 5 × 1\.5 × 2 micrometer \(Z Y X\): if that is right, "
                       r"pass --voxel-size 5 1\.5 2 --unit micrometer"):  # fmt: skip
        open_input(tmp_path / "ij.tif")
    with pytest.raises(InputError, match=r"OME metadata says 0\.05 × 0\.004 × 0\.002 millimeter"):
        open_input(tmp_path / "brain.ome.tif")
    convert(tmp_path / "brain.ome.tif", tmp_path / "a.zarr", voxel_size=(50.0, 4.0, 2.0), unit="um")  # the same size
    assert "differs from what its" not in caplog.text
    convert(tmp_path / "ij.tif", tmp_path / "b.zarr", voxel_size=(2.0, 1.5, 5.0))  # given in X Y Z order
    assert caplog.text.count("--voxel-size 2 1.5 5 micrometer differs from what its ImageJ metadata says (5 1.5 2") == 1


def test_a_one_component_nrrd_reads_as_its_3d_image(tmp_path: Path) -> None:
    """A 4-D NRRD whose first axis is a one-value ``list`` (``space directions: none ...``, as Slicer and ITK write
    a one-component vector volume) reads as the 3-D image, with the same grid; two components are refused."""
    data = _volume()  # (i, j, k) = (4, 5, 6)
    directions = np.array([[0.0, 0.0, 2.0], [-3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # permuted and flipped, LPS
    header = {"space": "left-posterior-superior", "space directions": directions, "space origin": np.array([1.0, 2.0, 3.0])}
    nrrd.write(str(tmp_path / "3d.nrrd"), data, header, index_order="F")
    one = dict(header, **{"space directions": np.vstack([np.full(3, np.nan), directions]),
                          "kinds": ["list", "domain", "domain", "domain"]})  # fmt: skip
    nrrd.write(str(tmp_path / "4d.nrrd"), data[None], one, index_order="F")
    expected, grid = load_nrrd(tmp_path / "3d.nrrd")
    array, grid4 = load_nrrd(tmp_path / "4d.nrrd")
    np.testing.assert_array_equal(array, expected)
    np.testing.assert_allclose(grid4.affine, grid.affine)
    nrrd.write(str(tmp_path / "two.nrrd"), np.stack([data, data]), one, index_order="F")
    with pytest.raises(InputError, match="holds a 4-D array: give a single-channel 3-D NRRD image"):
        load_nrrd(tmp_path / "two.nrrd")


@pytest.mark.parametrize("planes", [6, 40])
def test_a_tiff_stack_with_a_page_of_another_shape_is_refused(tmp_path: Path, planes: int) -> None:
    """Pages written one by one without shape metadata: a page of another shape in the middle (a damaged export) is
    refused, naming it; tifffile would read it into wrong values (40 planes: a ``uniform`` series, in the first page's
    shape) or leave it out and move the later planes up (6 planes: a ``generic`` series). A stack followed by a small
    preview page (its own series) still reads."""
    import tifffile

    from pipeline.importers import open_input

    stack = np.random.default_rng(0).integers(0, 60000, (planes, 10, 14), dtype=np.uint16)
    with tifffile.TiffWriter(tmp_path / "odd.tif") as tif:
        for k, plane in enumerate(stack):
            tif.write(plane if k != 3 else plane[:9], contiguous=False, metadata=None)
    with pytest.raises(InputError, match=rf"1 of {planes} pages differ from the other {planes - 1} \(shape \(10, 14\), "
                       r"uint16\): page 4 \(\(9, 14\), uint16\)"):  # fmt: skip
        open_input(tmp_path / "odd.tif", voxel_size=(5.0, 2.0, 1.0))
    with tifffile.TiffWriter(tmp_path / "preview.tif") as tif:
        for plane in stack:
            tif.write(plane, contiguous=False, metadata=None)
        tif.write(stack[2, ::2, ::2], contiguous=False, metadata=None)
    array, _, _ = open_input(tmp_path / "preview.tif", voxel_size=(5.0, 2.0, 1.0))
    np.testing.assert_array_equal(np.asarray(array), stack)


def test_an_nrrd_without_a_space_is_read_in_the_plain_frame_it_is_said_to_be(tmp_path: Path) -> None:
    """``space directions`` in no named space (``space dimension: 3`` only) state voxel sizes, not anatomy: the image is
    read in the plain frame the warning names (z → superior, y → anterior, x → right), as one with ``spacings``, not
    with its vectors taken as RAS."""
    data = _volume()  # (i, j, k) = (4, 5, 6)
    directions = np.array([[0.0, 0.0, 2.0], [-3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    nrrd.write(str(tmp_path / "vectors.nrrd"), data, {"space dimension": 3, "space directions": directions,
                                                      "space origin": np.array([1.0, 2.0, 3.0])}, index_order="F")  # fmt: skip
    nrrd.write(str(tmp_path / "spacings.nrrd"), data, {"spacings": [2.0, 3.0, 4.0]}, index_order="F")
    array, grid = load_nrrd(tmp_path / "vectors.nrrd")
    _, plain = load_nrrd(tmp_path / "spacings.nrrd")
    np.testing.assert_allclose(grid.affine, plain.affine)
    np.testing.assert_allclose(grid.spacing, [4.0, 3.0, 2.0])
    np.testing.assert_allclose(grid.direction, np.eye(3))
