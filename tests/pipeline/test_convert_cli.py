"""``patchmorph convert``: every input kind to OME-Zarr 0.5, bounded memory, one-sentence errors."""

from __future__ import annotations

import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.format import FormatV04
from ome_zarr.writer import write_image as ome_write_image
from typer.testing import CliRunner

from patchmorph.cli import app
from patchmorph_core.spatial import Grid, orientation_code
from pipeline.importers import convert, load_nifti, load_nrrd
from pipeline.ngff import read_image

RUNNER = CliRunner()


def _planes(folder: Path, n: int, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    folder.mkdir()
    stack = np.random.default_rng(n).integers(0, 60000, (n, *shape), dtype=np.uint16)
    for i, plane in enumerate(stack):
        tifffile.imwrite(folder / f"plane_{i}.tif", plane)  # natural order: plane_2 before plane_10
    return stack


def _level0(path: Path) -> np.ndarray:
    return np.asarray(read_image(path).levels[0].array[:])


def _peak_mb(source: Path, out: Path) -> float:
    tracemalloc.start()
    try:
        convert(source, out, voxel_size=(5.0, 1.0, 1.0))
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def test_plane_folder_converts_with_bounded_memory(tmp_path: Path) -> None:
    small, large = _planes(tmp_path / "small", 256), _planes(tmp_path / "large", 1024)
    convert(tmp_path / "small", tmp_path / "warmup.zarr", voxel_size=(5.0, 1.0, 1.0))  # imports, caches
    peak_small = _peak_mb(tmp_path / "small", tmp_path / "small.zarr")
    peak_large = _peak_mb(tmp_path / "large", tmp_path / "large.zarr")
    volume_mb = large.nbytes / 1e6
    # memory follows the write block (64^3 voxels), not the stack: 4x the planes, about the same peak
    assert peak_large < 0.5 * volume_mb, (peak_large, volume_mb)
    assert peak_large < 1.5 * peak_small + 0.5, (peak_small, peak_large)
    np.testing.assert_array_equal(_level0(tmp_path / "large.zarr"), large)
    np.testing.assert_array_equal(_level0(tmp_path / "small.zarr"), small)


@pytest.mark.parametrize("layout", [{"rowsperstrip": 4}, {"tile": (16, 16)}], ids=["strips", "tiles"])
def test_plane_folder_strips_and_tiles_are_decoded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: dict
) -> None:
    """Each strip or tile of a compressed plane folder is decoded once by its conversion, however many write blocks
    (here 5 rows x 7 columns of them per plane) it crosses: not once per block (docs/scale.md, *Reading a TIFF plane
    folder once*)."""
    folder = tmp_path / "planes"
    folder.mkdir()
    stack = np.random.default_rng(5).integers(0, 60000, (6, 40, 56), dtype=np.uint16)
    for k, plane in enumerate(stack):
        tifffile.imwrite(folder / f"section_{k}.tif", plane, compression="zlib", **layout)
    decoded: Counter[tuple[str, int]] = Counter()
    page_decode = tifffile.TiffPage.__dict__["decode"]

    def counting_decode(page: tifffile.TiffPage) -> Callable[..., tuple]:
        decode = page_decode.__get__(page, tifffile.TiffPage)

        def spy(data: bytes | None, index: int, **kwargs: object) -> tuple:
            decoded[(Path(page.parent.filehandle.path).name, index)] += 1
            return decode(data, index, **kwargs)

        return spy

    monkeypatch.setattr(tifffile.TiffPage, "decode", property(counting_decode))
    convert(folder, tmp_path / "o.zarr", voxel_size=(5.0, 1.0, 1.0), chunks=(2, 8, 8))
    segments = len(tifffile.TiffFile(folder / "section_0.tif").pages[0].dataoffsets)
    assert len(decoded) == stack.shape[0] * segments
    assert max(decoded.values()) == 1, decoded.most_common(3)
    np.testing.assert_array_equal(_level0(tmp_path / "o.zarr"), stack)


def test_tiff_stack_with_orientation(tmp_path: Path) -> None:
    stack = np.random.default_rng(1).integers(0, 255, (9, 10, 11), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    out = convert(tmp_path / "stack.tif", tmp_path / "s.zarr", voxel_size=(50, 40, 40), orientation="psl")
    image = read_image(out)
    np.testing.assert_array_equal(np.asarray(image.levels[0].array[:]), stack)
    expected = Grid.from_orientation(stack.shape, (50, 40, 40), "psl", unit="micrometer")
    np.testing.assert_allclose(image.grid.affine, expected.affine)


def test_nifti_and_nrrd_keep_their_header_geometry(tmp_path: Path) -> None:
    data = np.random.default_rng(2).random((7, 8, 9)).astype(np.float32)
    ras = np.array([[0.0, 0, -2.0, 5], [1.5, 0, 0, -3], [0, 0.5, 0, 7], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, ras), tmp_path / "a.nii.gz")
    header = {"space": "left-posterior-superior", "space directions": np.diag([2.0, 3.0, 4.0]),
              "space origin": np.array([1.0, 2.0, 3.0])}  # fmt: skip
    nrrd.write(str(tmp_path / "b.nrrd"), data, header, index_order="F")
    for name, loader in (("a.nii.gz", load_nifti), ("b.nrrd", load_nrrd)):
        array, grid = loader(tmp_path / name)
        image = read_image(convert(tmp_path / name, tmp_path / f"{name}.zarr"))
        np.testing.assert_array_equal(np.asarray(image.levels[0].array[:]), array)
        np.testing.assert_allclose(image.grid.affine, grid.affine)
        assert image.unit == grid.unit == "millimeter"


@pytest.mark.parametrize(
    ("stored", "slope", "inter", "values"),
    [("int16", 4.0, 0.0, "float32"), ("uint8", 1 / 250, 0.0, "float32"), ("int16", 0.5, 10.0, "float32"),
     ("int32", 3.0, 0.0, "float64")],
)  # fmt: skip
def test_nifti_scaled_values_are_converted_as_scaled(
    tmp_path: Path, stored: str, slope: float, inter: float, values: str
) -> None:
    """A NIfTI whose header scales its stored integers (scl_slope / scl_inter: a probability map as uint8, a CT or
    PET image as int16) keeps its values: 30000 × 4 is 120000, not int16's wrap-around, 200 / 250 is 0.8, not 0."""
    rng = np.random.default_rng(4)
    top = 250 if stored == "uint8" else 30000
    data = rng.integers(0, top, size=(7, 8, 9)).astype(stored)
    image = nib.Nifti1Image(data, np.diag([0.5, 0.7, 0.9, 1.0]))
    image.header.set_slope_inter(slope, inter)
    nib.save(image, tmp_path / "s.nii.gz")
    out = read_image(convert(tmp_path / "s.nii.gz", tmp_path / "s.zarr")).levels[0].array
    assert np.dtype(out.dtype) == np.dtype(values)
    expected = data.astype(np.float64).transpose(2, 1, 0) * slope + inter
    np.testing.assert_allclose(np.asarray(out[...], dtype=np.float64), expected, rtol=1e-6)


def test_ome_zarr_04_to_05(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(0, 999, (1, 8, 10, 12)).astype(np.uint16)
    root = zarr.open_group(str(tmp_path / "v04.zarr"), mode="w", zarr_format=2)
    ome_write_image(data, root, scale_factors=[2], fmt=FormatV04(), axes=["c", "z", "y", "x"],
                    scale={"c": 1.0, "z": 3.0, "y": 2.0, "x": 2.0},
                    axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"})  # fmt: skip
    out = convert(tmp_path / "v04.zarr", tmp_path / "v05.zarr")
    assert zarr.open_group(str(out), mode="r").metadata.zarr_format == 3
    image = read_image(out)
    np.testing.assert_array_equal(np.asarray(image.levels[0].array[:]), data[0])
    np.testing.assert_allclose(image.grid.spacing, [3, 2, 2])


def test_cli_converts_plane_folder(tmp_path: Path) -> None:
    _planes(tmp_path / "planes", 5, (6, 7))
    result = RUNNER.invoke(
        app, ["convert", str(tmp_path / "planes"), str(tmp_path / "o.zarr"), "--voxel-size", "2", "1", "1",
              "--orientation", "asr", "--unit", "um"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    np.testing.assert_allclose(read_image(tmp_path / "o.zarr").grid.spacing, [2, 1, 1])


def test_plane_numbers_in_steps_with_a_channel_number_are_no_gap(tmp_path: Path) -> None:
    """Sections numbered in steps of 2, with a channel number that does not vary, convert in their order."""
    folder = tmp_path / "planes"
    folder.mkdir()
    stack = np.random.default_rng(0).integers(0, 60000, (4, 5, 6), dtype=np.uint16)
    for i, plane in enumerate(stack):
        tifffile.imwrite(folder / f"brain1_section_{2 * i + 1:03d}_ch2.tif", plane)
    convert(folder, tmp_path / "o.zarr", voxel_size=(2.0, 1.0, 1.0))
    np.testing.assert_array_equal(_level0(tmp_path / "o.zarr"), stack)


# -- bad input: one sentence, exit code 2 ------------------------------------------------------------------
def _missing(tmp: Path) -> list[str]:
    return [str(tmp / "nope.tif"), str(tmp / "o.zarr")]


def _not_an_image(tmp: Path) -> list[str]:
    (tmp / "notes.txt").write_text("hello")
    return [str(tmp / "notes.txt"), str(tmp / "o.zarr")]


def _folder_without_images(tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return [str(tmp / "empty"), str(tmp / "o.zarr"), "--voxel-size", "1", "1", "1"]


def _no_multiscales(tmp: Path) -> list[str]:
    zarr.open_group(str(tmp / "plain.zarr"), mode="w")
    return [str(tmp / "plain.zarr"), str(tmp / "o.zarr")]


def _unknown_axes(tmp: Path) -> list[str]:
    group = zarr.open_group(str(tmp / "axes.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(2, 3, 4), dtype="u1")
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}],
                                   "axes": [{"name": "q"}, {"name": "y"}, {"name": "x"}]}]  # fmt: skip
    return [str(tmp / "axes.zarr"), str(tmp / "o.zarr")]


def _planes_with(voxel_size: list[str]) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        _planes(tmp / "planes", 3, (4, 5))
        return [str(tmp / "planes"), str(tmp / "o.zarr"), "--voxel-size", *voxel_size]

    return make


def _singular_affine(tmp: Path) -> list[str]:
    header = {
        "space": "right-anterior-superior",
        "space directions": np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1]]),
    }
    nrrd.write(str(tmp / "s.nrrd"), np.zeros((3, 4, 5), np.uint8), header)
    return [str(tmp / "s.nrrd"), str(tmp / "o.zarr")]


def _unknown_orientation(tmp: Path) -> list[str]:
    return [*_planes_with(["1", "1", "1"])(tmp), "--orientation", "psx"]


def _output_exists(tmp: Path) -> list[str]:
    (tmp / "o.zarr").mkdir()
    return _planes_with(["1", "1", "1"])(tmp)


def _overwrite_a_folder_of_the_users(tmp: Path) -> list[str]:
    (tmp / "o.zarr" / "sub").mkdir(parents=True)
    (tmp / "o.zarr" / "notes.txt").write_text("important")
    return [*_planes_with(["1", "1", "1"])(tmp), "--overwrite"]


def _overwrite_a_file(tmp: Path) -> list[str]:
    (tmp / "o.zarr").write_text("important")
    return [*_planes_with(["1", "1", "1"])(tmp), "--overwrite"]


def _tiff_without_voxel_size(tmp: Path) -> list[str]:
    tifffile.imwrite(tmp / "stack.tif", np.zeros((3, 4, 5), np.uint8))
    return [str(tmp / "stack.tif"), str(tmp / "o.zarr")]


def _stray_plane(tmp: Path) -> list[str]:
    _planes(tmp / "planes", 4, (6, 7))
    tifffile.imwrite(tmp / "planes" / "overview.tif", np.zeros((9, 9), np.uint16))  # sorts after plane_3
    return [str(tmp / "planes"), str(tmp / "o.zarr"), "--voxel-size", "1", "1", "1"]


def _plane_of_another_type(tmp: Path) -> list[str]:
    _planes(tmp / "planes", 4, (6, 7))
    tifffile.imwrite(tmp / "planes" / "plane_2.tif", np.zeros((6, 7), np.uint8))
    return [str(tmp / "planes"), str(tmp / "o.zarr"), "--voxel-size", "1", "1", "1"]


def _projection_beside_the_planes(tmp: Path) -> list[str]:
    _planes(tmp / "planes", 4, (6, 7))
    tifffile.imwrite(tmp / "planes" / "MAX_planes.tif", np.ones((6, 7), np.uint16))  # as Fiji saves one; sorts first
    return [str(tmp / "planes"), str(tmp / "o.zarr"), "--voxel-size", "1", "1", "1"]


def _two_channels_interleaved(tmp: Path) -> list[str]:
    folder = tmp / "planes"
    folder.mkdir()
    for z in range(1, 5):  # a microscope's export: Z001_C1.tif, Z001_C2.tif, Z002_C1.tif, ...
        for c in (1, 2):
            tifffile.imwrite(folder / f"Z{z:03d}_C{c}.tif", np.full((6, 7), 10 * z + c, np.uint16))
    return [str(folder), str(tmp / "o.zarr"), "--voxel-size", "1", "1", "1"]


def _missing_plane(tmp: Path) -> list[str]:
    _planes(tmp / "planes", 12, (6, 7))
    (tmp / "planes" / "plane_9.tif").unlink()
    return [str(tmp / "planes"), str(tmp / "o.zarr"), "--voxel-size", "1", "1", "1"]


BAD_INPUTS = {
    "missing path": (_missing, "does not exist"),
    "not an image": (_not_an_image, "not a supported image"),
    "folder without images": (_folder_without_images, "holds no TIFF planes"),
    "NGFF without multiscales": (_no_multiscales, "no NGFF 'multiscales'"),
    "unknown axis names": (_unknown_axes, "axes"),
    "zero voxel size": (_planes_with(["0", "1", "1"]), "invalid voxel size"),
    "negative voxel size": (_planes_with(["1", "-2", "1"]), "invalid voxel size"),
    "NaN voxel size": (_planes_with(["nan", "1", "1"]), "invalid voxel size"),
    "singular affine": (_singular_affine, "singular"),
    "unknown orientation code": (_unknown_orientation, "unknown orientation code"),
    "output exists": (_output_exists, "already exists"),
    "--overwrite on a folder that is not a Zarr store": (_overwrite_a_folder_of_the_users, "is a folder that is not"),
    "--overwrite on a file": (_overwrite_a_file, "is a file that is not a Zarr store"),
    "TIFF without voxel size": (_tiff_without_voxel_size, "--voxel-size"),
    "a stray plane of another size": (_stray_plane, "overview.tif ((9, 9), uint16); move them out"),
    "a plane of another type": (_plane_of_another_type, "plane_2.tif ((6, 7), uint8)"),
    "a projection beside the planes": (_projection_beside_the_planes, "MAX_planes.tif; they would be stacked"),
    "two channels interleaved": (_two_channels_interleaved, "(e.g. Z001_C1.tif and Z001_C2.tif)"),
    "a missing plane": (_missing_plane, "skips section numbers between plane_8.tif and plane_10.tif"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_sentence_and_exit_2(tmp_path: Path, case: str) -> None:
    make, phrase = BAD_INPUTS[case]
    result = RUNNER.invoke(app, ["convert", *make(tmp_path)])
    assert result.exit_code == 2, (case, result.output)
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and phrase in lines[0], (case, result.output)
    assert lines[0].endswith("."), lines[0]
    assert not any(p.name.startswith(".o.zarr") for p in tmp_path.iterdir())  # no temporary leftovers
    if case.startswith("--overwrite on a folder"):
        assert (tmp_path / "o.zarr" / "notes.txt").read_text() == "important" and (tmp_path / "o.zarr" / "sub").is_dir()


@pytest.mark.parametrize("command", ["convert", "atlas", "make-atlas"])
@pytest.mark.parametrize("given", [["50,40,40"], ["50", "40"]])
def test_voxel_size_not_as_three_numbers_names_the_form(tmp_path: Path, command: str, given: list[str]) -> None:
    """``--voxel-size 50,40,40`` or two numbers (the next option taken as the third) is refused, exit 2, with
    the form it takes, before any input is read."""
    inputs = {"convert": ["in.tif", "o.zarr"], "atlas": ["in.tif", "--atlas", "a"], "make-atlas": ["t.nii", "l.nii"]}
    result = RUNNER.invoke(app, [command, *inputs[command], "--voxel-size", *given, "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "three numbers in the array's axis order Z Y X" in text and "--voxel-size 50 40 40" in text, text


def test_preview_labels_the_mid_planes_to_find_an_orientation(tmp_path: Path, examples: Path) -> None:
    """``convert --preview`` alone reads only three planes and names the anatomical sides at their edges."""
    from matplotlib.image import imread

    brain = examples / "mouse_stp_brainreg" / "brain_50x40x40um_psl.tif"
    png = tmp_path / "preview.png"
    result = RUNNER.invoke(
        app,
        [
            "convert",
            str(brain),
            "--voxel-size",
            "50",
            "40",
            "40",
            "--orientation",
            "psl",
            "--preview",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    assert imread(png).shape[0] > 300 and not list(tmp_path.glob("*.zarr"))
    from pipeline.qc import plane_views

    coronal, horizontal, sagittal = plane_views("psl")
    assert coronal.title.startswith("coronal") and coronal.edges == ("S", "I", "L", "R")
    assert horizontal.title.startswith("horizontal") and horizontal.edges == ("P", "A", "L", "R")
    assert sagittal.title.startswith("sagittal") and sagittal.edges == ("P", "A", "S", "I")
    result = RUNNER.invoke(app, ["convert", str(brain), "--voxel-size", "50", "40", "40"])
    assert result.exit_code == 2 and "no OUTPUT given" in result.output


def test_an_orientation_that_contradicts_the_header_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A NIfTI header states its orientation: --orientation with the same code is silent, another code (or one for
    a tilted header, whose rotation it drops) gets a warning naming what the header says."""
    volume = np.random.default_rng(0).random((9, 14, 5)).astype(np.float32)
    straight, tilted = np.diag([0.5, 0.25, 2.0, 1.0]), np.diag([0.5, 0.25, 2.0, 1.0])
    c, s = np.cos(0.2), np.sin(0.2)
    tilted[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ tilted[:3, :3]
    for name, affine in (("straight", straight), ("tilted", tilted)):
        nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / f"{name}.nii.gz"))
    # nibabel's i, j, k run to R, A, S; our arrays are (k, j, i): index 0 at I, P, L
    for name, code, warned in (("straight", "ipl", None), ("straight", "spl", "orientation 'ipl'"),
                               ("tilted", "ipl", "oblique axes, nearest code 'ipl'")):  # fmt: skip
        caplog.clear()
        convert(tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_{code}.ome.zarr", orientation=code)
        said = [r.getMessage() for r in caplog.records if "replaces what the header" in r.getMessage()]
        assert (said == []) if warned is None else (len(said) == 1 and warned in said[0]), (name, code, said)


def test_a_killed_conversion_resumes_with_the_slabs_it_wrote(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A plane folder's conversion killed (SIGKILL) after two of its five slabs: nothing at the output's path, and
    the same conversion again keeps those two slabs and writes the rest, to the same image as one whole run."""
    import logging

    from killed_helpers import killed_after_slabs

    stack = _planes(tmp_path / "planes", 40, (30, 50))
    out = tmp_path / "brain.ome.zarr"
    killed = killed_after_slabs(
        "from pipeline.importers import convert\n"
        f"convert({str(tmp_path / 'planes')!r}, {str(out)!r}, voxel_size=(50, 2, 2), chunks=(8, 8, 8))\n",
        slabs=2,
    )
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and (tmp_path / ".brain.ome.zarr.converting").is_dir()
    with caplog.at_level(logging.INFO, logger="pipeline.ngff"):
        convert(tmp_path / "planes", out, voxel_size=(50, 2, 2), chunks=(8, 8, 8))
    assert "2 slabs of level 0 were written before" in caplog.text
    np.testing.assert_array_equal(_level0(out), stack)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brain.ome.zarr", "planes"]
    killed = killed_after_slabs(  # stopped and never run again: the next conversion beside it names it
        "from pipeline.importers import convert\n"
        f"convert({str(tmp_path / 'planes')!r}, {str(tmp_path / 'lost.ome.zarr')!r}, voxel_size=(50, 2, 2), chunks=(8, 8, 8))\n",
        slabs=1,
    )
    assert killed.returncode == -9, killed.stderr
    caplog.clear()
    convert(tmp_path / "planes", tmp_path / "other.ome.zarr", voxel_size=(50, 2, 2), chunks=(8, 8, 8))
    said = [r.getMessage() for r in caplog.records if "unfinished conversion" in r.getMessage()]
    assert len(said) == 1 and "into lost.ome.zarr" in said[0] and ".lost.ome.zarr.converting.run" in said[0], said


def test_an_orientation_the_header_states_keeps_the_header_origin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--orientation with the code a NIfTI header states (anisotropic, off-centre) keeps the header's grid, so the
    converted image lies where ITK and nibabel place the file; another code centres it and the warning says the
    origin is dropped too."""
    affine = np.array([[-0.5, 0, 0, 31.0], [0, 0, 0.25, -12.0], [0, -2.0, 0, 44.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((9, 14, 5)).astype(np.float32), affine), tmp_path / "a.nii.gz")
    _, header = load_nifti(tmp_path / "a.nii.gz")
    code = orientation_code(header.direction)
    kept = read_image(convert(tmp_path / "a.nii.gz", tmp_path / "same.ome.zarr", orientation=code)).grid
    np.testing.assert_allclose(kept.affine, header.affine, atol=1e-9)
    caplog.clear()
    other = code[::-1]
    moved = read_image(convert(tmp_path / "a.nii.gz", tmp_path / "other.ome.zarr", orientation=other)).grid
    np.testing.assert_allclose(moved.center, 0.0, atol=1e-9)
    said = [r.getMessage() for r in caplog.records if "replaces what the header" in r.getMessage()]
    assert len(said) == 1 and "sides and origin are dropped" in said[0]


def test_nifti_and_nrrd_that_state_no_orientation_are_read_as_a_tiff_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NIfTI whose qform and sform codes are 0 (ANALYZE's layout) and an NRRD with spacings but no ``space`` hold
    voxel sizes only (ITK and nibabel each invent another frame for them): read in the plain frame with the warning
    that no orientation is known, written without RFC-4 orientations; with a code they carry it as given."""
    volume = np.random.default_rng(3).random((7, 8, 9)).astype(np.float32)  # file axes (i, j, k)
    plain = nib.Nifti1Image(volume, np.diag([0.7, 1.3, 2.9, 1.0]))
    plain.set_sform(None, code=0)
    plain.set_qform(None, code=0)
    plain.header.set_zooms((0.7, 1.3, 2.9))
    nib.save(plain, tmp_path / "plain.nii.gz")
    nrrd.write(str(tmp_path / "plain.nrrd"), volume, {"spacings": [0.7, 1.3, 2.9], "axis mins": [10.0, 20.0, 30.0]},
               index_order="F")  # fmt: skip
    for name in ("plain.nii.gz", "plain.nrrd"):
        caplog.clear()
        out = convert(tmp_path / name, tmp_path / f"{name}.ome.zarr")
        assert any("carries no anatomical orientation" in r.getMessage() for r in caplog.records), name
        grid = read_image(out).grid
        np.testing.assert_allclose(grid.affine, np.diag([2.9, 1.3, 0.7, 1.0]), atol=1e-6)
        axes = dict(zarr.open_group(str(out), mode="r").attrs)["ome"]["multiscales"][0]["axes"]
        assert all("orientation" not in axis for axis in axes), (name, axes)
        given = read_image(convert(tmp_path / name, tmp_path / f"{name}.psl.ome.zarr", orientation="psl")).grid
        np.testing.assert_allclose(given.center, 0.0, atol=1e-9)


def test_a_label_map_of_fractional_values_is_refused(tmp_path: Path) -> None:
    """--labels on a float image whose values are not whole numbers (an intensity image, labels interpolated) is
    refused in one sentence; float labels with whole values are taken."""
    affine = np.diag([0.5, 0.25, 2.0, 1.0])
    whole = np.random.default_rng(3).integers(0, 9, (9, 14, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(whole, affine), tmp_path / "whole.nii.gz")
    nib.save(nib.Nifti1Image(whole + 0.3, affine), tmp_path / "blurred.nii.gz")
    result = RUNNER.invoke(app, ["convert", str(tmp_path / "blurred.nii.gz"), str(tmp_path / "b.zarr"), "--labels"])
    assert result.exit_code == 2 and "not whole numbers (e.g. " in result.output, result.output
    assert not (tmp_path / "b.zarr").exists()
    result = RUNNER.invoke(app, ["convert", str(tmp_path / "whole.nii.gz"), str(tmp_path / "w.zarr"), "--labels"])
    assert result.exit_code == 0, result.output


def test_a_conversion_killed_at_its_rename_is_moved_into_place(tmp_path: Path) -> None:
    """A conversion killed (SIGKILL) after its pyramid was finished, before it was renamed into place: the same
    conversion again moves it into place (it refused 'cannot resume ...: it is complete', with and without
    overwrite, until the hidden folders were removed by hand)."""
    from killed_helpers import run_python

    stack = _planes(tmp_path / "planes", 40, (30, 50))
    out = tmp_path / "brain.ome.zarr"
    killed = run_python(
        "import os, signal\n"
        "import pipeline.ngff as ngff\n"
        "from pipeline.importers import convert\n"
        "ngff._replace = lambda tmp, out: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"convert({str(tmp_path / 'planes')!r}, {str(out)!r}, voxel_size=(50, 2, 2), chunks=(8, 8, 8))\n"
    )
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and (tmp_path / ".brain.ome.zarr.converting").is_dir()
    convert(tmp_path / "planes", out, voxel_size=(50, 2, 2), chunks=(8, 8, 8))
    np.testing.assert_array_equal(_level0(out), stack)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brain.ome.zarr", "planes"]


def test_plane_names_with_two_section_numbers_are_one_series(tmp_path: Path) -> None:
    """STP stitching software names the optical sections of each physical section ``section_001_01.tif``,
    ``section_001_02.tif``, ``section_002_01.tif``, ...: no single number tells the planes apart, but they are one
    series in name order (not channels, which a channel number names: ``Z001_C1.tif``, refused above)."""
    from patchmorph_core.errors import InputError
    from pipeline.importers import check_one_series

    planes = [tmp_path / f"section_{s:03d}_{o:02d}.tif" for s in (1, 2, 3) for o in (1, 2)]
    check_one_series(tmp_path, planes)
    for names in (["ch1_z001.tif", "ch1_z002.tif", "ch2_z001.tif", "ch2_z002.tif"], ["z1_c1.tif", "z1_c2.tif"]):
        with pytest.raises(InputError, match="holds the planes of 2 channels"):
            check_one_series(tmp_path, [tmp_path / n for n in names])



def test_one_channel_of_a_multi_channel_image_is_converted_with_channel_index(tmp_path: Path) -> None:
    """A two-channel OME-Zarr image (axes c, z, y, x, as bioformats2raw writes an STP brain's channels) and a
    two-channel ImageJ hyperstack (axes Z, C, Y, X) are refused without --channel-index, naming the option; with it,
    the channel asked for is converted, on the image's own grid; a channel it lacks, and the option on a one-channel
    input, are refused."""
    rng = np.random.default_rng(3)
    data = rng.integers(0, 4000, (2, 5, 7, 9)).astype(np.uint16)  # (C, Z, Y, X): anisotropic, non-cubic
    root = zarr.open_group(str(tmp_path / "two.zarr"), mode="w", zarr_format=2)
    ome_write_image(data, root, scale_factors=[], fmt=FormatV04(), axes=["c", "z", "y", "x"],
                    scale={"c": 1.0, "z": 50.0, "y": 2.0, "x": 1.5},
                    axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"})  # fmt: skip
    tifffile.imwrite(tmp_path / "two.tif", np.moveaxis(data, 0, 1), imagej=True, metadata={"axes": "ZCYX"})
    for source, size in ((tmp_path / "two.zarr", []), (tmp_path / "two.tif", ["--voxel-size", "50", "2", "1.5"])):
        refused = RUNNER.invoke(app, ["convert", str(source), str(tmp_path / "o.zarr"), *size])
        assert refused.exit_code == 2 and "--channel-index N" in refused.output, refused.output
        for channel in (0, 1):
            out = tmp_path / f"{source.suffix[1:]}_{channel}.ome.zarr"
            done = RUNNER.invoke(app, ["convert", str(source), str(out), *size, "--channel-index", str(channel)])
            assert done.exit_code == 0, done.output
            np.testing.assert_array_equal(_level0(out), data[channel])
            np.testing.assert_allclose(read_image(out).grid.spacing, [50.0, 2.0, 1.5])
        wrong = RUNNER.invoke(app, ["convert", str(source), str(tmp_path / "w.zarr"), *size, "--channel-index", "2"])
        assert wrong.exit_code == 2 and "which holds 2: give 0 to 1" in wrong.output, wrong.output
    _planes(tmp_path / "planes", 3, (6, 7))
    one = RUNNER.invoke(app, ["convert", str(tmp_path / "planes"), str(tmp_path / "p.zarr"), "--voxel-size", "1", "1",
                              "1", "--channel-index", "0"])  # fmt: skip
    assert one.exit_code == 2 and "holds one: leave it out" in one.output, one.output


def test_an_ome_zarr_image_is_read_in_the_outputs_write_units_on_a_cluster(tmp_path: Path, dask_scheduler: str) -> None:
    """An OME-Zarr image stored in chunks smaller than the output's write units is read a unit per task: its chunks
    are not read one task each and gathered onto one worker (docs/scale.md, *The atlas job on a large brain*)."""
    from distributed import Client, get_task_stream

    from pipeline.ngff import write_image

    volume = np.random.default_rng(3).integers(0, 4000, size=(24, 20, 14), dtype=np.uint16)
    grid = Grid.from_orientation(volume.shape, (50.0, 20.0, 20.0), "psl")
    source = write_image(tmp_path / "small_chunks.ome.zarr", volume, grid, chunks=(4, 5, 7))
    with Client(dask_scheduler) as client, get_task_stream(client) as stream:
        out = convert(source, tmp_path / "converted.ome.zarr", chunks=(12, 20, 14), scheduler=dask_scheduler)
    keys = [str(task["key"]) for task in stream.data]
    assert not [key for key in keys if "rechunk" in key]  # without it: a task per 4 × 5 × 7 chunk, then merges
    assert sum("from-zarr" in key for key in keys) == 2  # two write units of 12 × 20 × 14
    np.testing.assert_array_equal(_level0(out), volume)


def test_a_plane_folders_mid_planes_are_read_from_its_strided_planes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check before a conversion reads a plane folder's mid planes from the planes their stride keeps, not
    through bands of every plane: the planes across y and x read a terabyte stack whole before its conversion."""
    import pipeline.importers as importers

    folder = tmp_path / "planes"
    folder.mkdir()
    stack = np.random.default_rng(8).integers(1, 60000, (40, 30, 44), dtype=np.uint16)
    for k, plane in enumerate(stack):
        tifffile.imwrite(folder / f"section_{k}.tif", plane, compression="zlib", rowsperstrip=4)
    opened = importers.open_input(folder, voxel_size=(50.0, 10.0, 10.0))
    monkeypatch.setattr(importers, "PREVIEW_SIZE", 8)  # strides 5, 4 and 6
    expected, stride = importers.mid_planes(opened[0])
    opened_files: set[str] = set()
    real_file = tifffile.TiffFile

    def spy(path: Path, *args: object, **kwargs: object) -> tifffile.TiffFile:
        opened_files.add(Path(path).name)
        return real_file(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "TiffFile", spy)
    importers.check_source_planes(folder, "brain", opened=opened)
    assert opened_files == {f"section_{k}.tif" for k in range(0, 40, 5)}  # the mid plane, 20, is one of them
    opened_files.clear()  # a label map of floating-point ids: checked for whole numbers on the same planes
    importers.check_whole_labels(opened[0].astype(np.float32), folder, opened[2])
    assert opened_files == {f"section_{k}.tif" for k in range(0, 40, 5)}
    monkeypatch.setattr(tifffile, "TiffFile", real_file)
    planes, got_stride = importers.input_mid_planes(folder, opened[0], opened[2])
    assert got_stride == stride == [5, 4, 6]
    for plane, want in zip(planes, expected, strict=True):
        np.testing.assert_array_equal(plane, want)
