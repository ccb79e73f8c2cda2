"""Pre-flight checks: outputs never overlap inputs, checkpoints are not overwritten by accident, room on disk,
bad images, implausible sizes and wrong orientation codes are refused before heavy work (on real brains)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from patchmorph_core.errors import InputError
from patchmorph_core.orientation import check_orientation, signed_permutations
from patchmorph_core.source import MultiscaleImage, downsample, downsampled_grid
from patchmorph_core.spatial import Grid, orientation_code
from patchmorph_core.synth import random_intensities, synthesize_image
from pipeline.checks import (
    CheckOptions,
    check_checkpoint,
    check_free_space,
    check_image,
    check_outputs,
    check_pair,
    check_writable,
    part_of_a_brain,
)
from pipeline.importers import load_nrrd


@pytest.mark.parametrize(
    ("output", "relation"),
    [("data/brain.zarr", "is"), ("data", "contains"), ("data/brain.zarr/field.zarr", "lies inside")],
)
def test_output_overlapping_an_input_is_refused(tmp_path: Path, output: str, relation: str) -> None:
    (tmp_path / "data" / "brain.zarr").mkdir(parents=True)
    with pytest.raises(InputError, match=rf"output .* {relation} the fixed input .*brain\.zarr"):
        check_outputs(inputs={"fixed": tmp_path / "data" / "brain.zarr"}, outputs={"output": tmp_path / output})
    check_outputs(inputs={"fixed": tmp_path / "data" / "brain.zarr"}, outputs={"output": tmp_path / "field.zarr"})


def test_symlinked_output_is_compared_by_its_target(tmp_path: Path) -> None:
    (tmp_path / "brain.zarr").mkdir()
    os.symlink(tmp_path / "brain.zarr", tmp_path / "alias.zarr")
    with pytest.raises(InputError, match="is the moving input"):
        check_outputs(inputs={"moving": tmp_path / "brain.zarr"}, outputs={"output": tmp_path / "alias.zarr"})


def test_existing_checkpoint_needs_resume_or_overwrite(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    check_checkpoint(checkpoint, resume=False, overwrite=False)  # nothing there yet
    checkpoint.write_bytes(b"weights")
    with pytest.raises(InputError, match="already exists: pass --resume .* --overwrite"):
        check_checkpoint(checkpoint, resume=False, overwrite=False)
    check_checkpoint(checkpoint, resume=True, overwrite=False)
    check_checkpoint(checkpoint, resume=False, overwrite=True)
    with pytest.raises(InputError, match="contradict"):
        check_checkpoint(checkpoint, resume=True, overwrite=True)


def test_output_folder_must_exist_and_have_room(tmp_path: Path) -> None:
    check_writable(tmp_path)
    with pytest.raises(InputError, match="does not exist: create it first"):
        check_writable(tmp_path / "missing")
    check_free_space(tmp_path, 1, "the field x.zarr")
    with pytest.raises(InputError, match=r"the field x\.zarr needs up to 1e\+06 TB but .* free"):
        check_free_space(tmp_path, 10**18, "the field x.zarr")


def _blob(shape: tuple[int, int, int], spacing: tuple[float, float, float], unit: str = "millimeter") -> MultiscaleImage:
    """A smooth anisotropic ellipsoid of tissue on a rotated grid (so no axis order can hide)."""
    grid = Grid.from_orientation(shape, spacing, "lia", unit=unit)
    index = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), axis=-1)
    radius = np.sqrt(((index / np.array([0.7, 0.5, 0.6])) ** 2).sum(-1))
    return MultiscaleImage.from_array(np.clip(1.2 - radius, 0, 1).astype(np.float32), grid)


def test_constant_empty_and_nan_images_are_refused() -> None:
    image = _blob((30, 36, 24), (2.0, 1.5, 2.5))
    check_image(image, "fixed", "f.zarr")
    grid = image.grid
    with pytest.raises(InputError, match=r"fixed image f\.zarr is constant \(every voxel is 0\)"):
        check_image(MultiscaleImage.from_array(np.zeros(grid.shape, np.float32), grid), "fixed", "f.zarr")
    sparse = np.zeros(grid.shape, np.float32)
    sparse[3, 4, 5] = 1.0
    with pytest.raises(InputError, match=r"moving image m\.zarr is empty"):
        check_image(MultiscaleImage.from_array(sparse, grid), "moving", "m.zarr")
    nan = np.asarray(image.levels[0].array).copy()
    nan[5, 5, 5] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        check_image(MultiscaleImage.from_array(nan, grid), "moving", "m.zarr")


def test_size_mismatch_of_a_wrong_unit_is_refused() -> None:
    fixed = _blob((30, 36, 24), (2.0, 1.5, 2.5))
    moving = _blob((30, 36, 24), (2.0, 1.5, 2.5), unit="micrometer")  # the same numbers, 1000x too small
    paths = {"fixed": "f.zarr", "moving": "m.zarr"}
    with pytest.raises(InputError, match=r"moving image m\.zarr spans .* millimeter of tissue .* more than 3x"):
        check_pair(fixed, moving, paths)
    record = check_pair(fixed, moving, paths, CheckOptions(allow_size_mismatch=True, accept_orientation=True))
    assert record["geometry"]["largest_ratio"] > 900 and record["geometry"]["allowed"]


# -- orientation on the bundled real brains -----------------------------------------------------------------
@pytest.fixture(scope="module")
def mouse_pair(examples: Path) -> tuple[np.ndarray, Grid, np.ndarray, tuple[float, ...]]:
    """The STP brain (psl) block-averaged to 200x160x160 um and the Allen template (100 um) as arrays."""
    brain = tifffile.imread(examples / "mouse_stp_brainreg" / "brain_50x40x40um_psl.tif").astype(np.float32)
    grid = Grid.from_orientation(brain.shape, (50.0, 40.0, 40.0), "psl")
    small = downsample(brain, (4, 4, 4))
    template, template_grid = load_nrrd(examples / "mouse_ccf" / "average_template_100.nrrd", orientation="rsa")
    fixed_grid = downsampled_grid(grid, (4, 4, 4), small.shape)
    return small, fixed_grid, template.astype(np.float32), tuple(template_grid.spacing)


def _image(array: np.ndarray, spacing: tuple[float, ...], code: str) -> MultiscaleImage:
    return MultiscaleImage.from_array(array, Grid.from_orientation(array.shape, spacing, code))


def test_right_orientation_codes_pass(mouse_pair: tuple) -> None:
    brain, brain_grid, template, spacing = mouse_pair
    fixed = MultiscaleImage.from_array(brain, brain_grid)
    result = check_orientation(fixed, _image(template, spacing, "rsa"))
    assert not result.fits_better
    assert result.best.is_identity  # its left-right mirror, which may score the same, is no rival
    record = check_pair(fixed, _image(template, spacing, "rsa"), {"fixed": "brain", "moving": "atlas"})
    assert record["orientation"]["given"]["refined"] < 0.05 and not record["orientation"]["fits_better"]


@pytest.mark.parametrize(("brain_code", "atlas_code"), [("psl", "asr"), ("pls", "rsa")])
def test_wrong_orientation_code_is_named(mouse_pair: tuple, brain_code: str, atlas_code: str) -> None:
    """The issue's two cases: the atlas read as ``asr`` instead of ``rsa``, the brain's ``psl`` given as ``pls``."""
    brain, brain_grid, template, spacing = mouse_pair
    fixed = MultiscaleImage.from_array(brain, Grid.from_orientation(brain.shape, brain_grid.spacing, brain_code))
    moving = _image(template, spacing, atlas_code)
    result = check_orientation(fixed, moving)
    assert result.fits_better
    fixed_code, moving_code = result.suggested_codes(fixed.grid.direction, moving.grid.direction)
    # the right code, not its left-right mirror (which fits as well): the suggestion keeps the given l or r
    if atlas_code != "rsa":
        assert moving_code == "rsa"
    else:
        assert fixed_code == "psl"
    with pytest.raises(InputError, match=r"fits the fixed image brain clearly better with one orientation code changed, the fixed image's to '\w{3}' instead of '\w{3}' or the moving image's to '\w{3}' instead of"):
        check_pair(fixed, moving, {"fixed": "brain", "moving": "atlas"})
    record = check_pair(fixed, moving, {"fixed": "brain", "moving": "atlas"}, CheckOptions(accept_orientation=True))
    assert record["orientation"]["fits_better"] and record["orientation"]["accepted"]


@pytest.mark.parametrize(("flipped_axis", "right_code"), [(0, "asl"), (1, "pil")])
def test_a_flipped_axis_is_named_without_swapping_the_hemispheres(
    mouse_pair: tuple, flipped_axis: int, right_code: str
) -> None:
    """A stack whose planes (or rows) run the other way, given the code of the original: the suggested code flips
    that axis alone. Its left-right mirror fits as well and a code that changes two axes is a proper rotation,
    so the best-scoring candidate alone would often swap the hemispheres."""
    brain, brain_grid, template, spacing = mouse_pair
    flipped = np.flip(brain, axis=flipped_axis).copy()
    fixed = MultiscaleImage.from_array(flipped, Grid.from_orientation(flipped.shape, brain_grid.spacing, "psl"))
    moving = _image(template, spacing, "rsa")
    result = check_orientation(fixed, moving)
    assert result.fits_better
    fixed_code, moving_code = result.suggested_codes(fixed.grid.direction, moving.grid.direction)
    assert fixed_code == right_code
    assert moving_code is not None and "r" in moving_code  # the atlas's right side stays where it is


@pytest.fixture(scope="module")
def repainted_atlas(examples: Path) -> MultiscaleImage:
    """The Allen annotation (100 µm, ``rsa``) painted one random intensity per structure, blurred and noisy: an
    MRI-style atlas of another contrast than the STP brain (the user trial's)."""
    annotation, grid = load_nrrd(
        examples / "mouse_ccf" / "annotation_100um_2017_nearest_from25um.nrrd", orientation="rsa"
    )
    ids, inverse = np.unique(np.rint(annotation).astype(np.int64), return_inverse=True)
    labels = inverse.reshape(annotation.shape).astype(np.int32)
    rng = np.random.default_rng(0)
    table = {k: 0.2 + 0.8 * v for k, v in random_intensities(range(1, len(ids)), rng).items()}
    return MultiscaleImage.from_array(synthesize_image(labels, rng, table, skull_strip=False), grid)


@pytest.mark.parametrize("brain_code", ["psl", "asl", "pil"])
def test_wrong_code_is_refused_across_contrasts(
    mouse_pair: tuple, repainted_atlas: MultiscaleImage, brain_code: str
) -> None:
    """The STP brain against an atlas painted per structure (no intensity mapping relates the two): the right code
    passes, a flipped anterior-posterior or dorsal-ventral axis is refused and the right code named (the global
    NCC of the former check scored such wrong codes almost as well as the right one, and nothing fired)."""
    brain, brain_grid, _, _ = mouse_pair
    fixed = MultiscaleImage.from_array(brain, Grid.from_orientation(brain.shape, brain_grid.spacing, brain_code))
    names = {"fixed": "brain", "moving": "atlas"}
    if brain_code == "psl":
        record = check_pair(fixed, repainted_atlas, names)
        assert not record["orientation"]["fits_better"]
        return
    result = check_orientation(fixed, repainted_atlas)
    assert result.fits_better
    assert result.given.dissimilarity >= 1.3 * result.best.dissimilarity  # a margin over the rule (RATIO 1.1)
    assert result.suggested_codes(fixed.grid.direction, repainted_atlas.grid.direction)[0] == "psl"
    with pytest.raises(InputError, match=r"clearly better with one orientation code changed, the fixed image's to 'psl' instead of '\w{3}' or the moving image's to"):
        check_pair(fixed, repainted_atlas, names)


def test_part_of_a_brain_against_a_whole_atlas_gives_a_warning(
    mouse_pair: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    """One hemisphere of the brain (its x axis runs left to right) against the whole template: the ratio of the
    extents differs between the axes (2.0); the whole brain's does not (1.01)."""
    brain, brain_grid, template, spacing = mouse_pair
    moving = _image(template, spacing, "rsa")
    for part, warned in ((brain, False), (brain[:, :, : brain.shape[2] // 2], True)):
        caplog.clear()
        fixed = MultiscaleImage.from_array(part, Grid.from_orientation(part.shape, brain_grid.spacing, "psl"))
        with caplog.at_level("WARNING", logger="pipeline.checks"):
            record = check_pair(fixed, moving, {"fixed": "brain", "moving": "atlas"})
        assert ("may hold only part of a brain" in caplog.text) == warned, caplog.text
        assert (record["geometry"]["ratio_spread"] >= 1.6) == warned
        if warned:
            assert "along left-right" in caplog.text


def test_a_slab_is_refused_without_inviting_a_squeezed_registration(mouse_pair: tuple) -> None:
    """A 2.4 mm coronal slab of the brain (its z axis runs posterior to anterior) against the whole template: refused,
    and the sentence says what --allow-size-mismatch would do to a part of a brain (it said "if this is intended
    (e.g. a thin section)", and the atlas was then squeezed into the slab: positions 0.3 mm off, median). Allowed,
    the record says part of a brain; the whole brain's does not."""
    brain, brain_grid, template, spacing = mouse_pair
    moving = _image(template, spacing, "rsa")
    slab = brain[28:40]
    fixed = MultiscaleImage.from_array(slab, Grid.from_orientation(slab.shape, brain_grid.spacing, "psl"))
    paths = {"fixed": "slab", "moving": "atlas"}
    with pytest.raises(InputError, match="squeezes the whole of the other image into that part") as refused:
        check_pair(fixed, moving, paths)
    assert "e.g. a thin section" not in str(refused.value)
    record = check_pair(fixed, moving, paths, CheckOptions(allow_size_mismatch=True, accept_orientation=True))
    assert part_of_a_brain(record["geometry"])
    whole = MultiscaleImage.from_array(brain, brain_grid)
    assert not part_of_a_brain(check_pair(whole, moving, paths)["geometry"])


def test_voxel_sizes_given_in_x_y_z_order_are_named(mouse_pair: tuple) -> None:
    """The brain at 400 × 160 × 160 µm (every other plane) given as 160 160 400: its tissue takes another shape
    than the atlas's, and the reverse order would make them alike, so the voxel size is named, not the orientation
    code that a swap of axes would suggest; the right order passes, and --allow-size-mismatch lets the given one
    through. The same for the brain at 200 × 160 × 160 µm, whose given order passes the orientation check."""
    brain, brain_grid, template, spacing = mouse_pair
    planes = brain[::2]
    true = (2 * brain_grid.spacing[0], *brain_grid.spacing[1:])
    moving = _image(template, spacing, "rsa")
    names = {"fixed": "brain.tif", "moving": "atlas"}
    given = MultiscaleImage.from_array(planes, Grid.from_orientation(planes.shape, true[::-1], "psl"))
    with pytest.raises(InputError, match=r"fixed image brain\.tif has voxels of 160 160 400 micrometer .* reverse order, 400 160 160"):
        check_pair(given, moving, names)
    check_pair(given, moving, names, CheckOptions(allow_size_mismatch=True, accept_orientation=True))
    record = check_pair(MultiscaleImage.from_array(planes, Grid.from_orientation(planes.shape, true, "psl")), moving, names)
    assert record["geometry"]["ratio_spread"] < 1.25
    # the README's brain: 200 × 160 × 160 µm given as 160 160 200 (its tissue's spread 1.56, under the warning's)
    mild = MultiscaleImage.from_array(brain, Grid.from_orientation(brain.shape, brain_grid.spacing[::-1], "psl"))
    with pytest.raises(InputError, match=r"has voxels of 160 160 200 micrometer .* reverse order, 200 160 160"):
        check_pair(mild, moving, names)


def test_orientation_codes_round_trip() -> None:
    codes = {orientation_code(m @ np.diag([1.0, 1.0, 1.0])) for m in signed_permutations()}
    assert len(codes) == 48 and None not in codes


def test_a_gap_of_blank_planes_is_found_but_not_the_tissues_tapering_ends() -> None:
    """Lost sections inside the tissue are a gap (:func:`pipeline.checks.empty_planes`); planes of a voxel or two ahead
    of the tissue (a head's top planes, a speck of dust) are its tapering end, not a gap between planes with tissue
    (the benchmark's human heads, 2 mm, were warned of gaps at their first and last planes)."""
    from pipeline.checks import empty_planes

    blob = _blob((60, 40, 48), (0.5, 0.8, 0.7))  # (Z, Y, X) planes of 0.5 mm along axis 0
    array, grid = np.asarray(blob.levels[0].array).copy(), blob.levels[0].grid
    array[:8, 20, 24] = 1.0  # a thin stalk ahead of the tissue: planes of one voxel each
    assert empty_planes(MultiscaleImage.from_array(array, grid)) == []
    array[28:36] = 0  # 4 mm of planes lost
    assert empty_planes(MultiscaleImage.from_array(array, grid)) == [(14.0, 18.0)]

