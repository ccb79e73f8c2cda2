"""OME-Zarr I/O: NGFF 0.5 writing (images, labels, fields), 0.4/0.5 reading, completion and layout."""

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tensorstore as ts
import zarr
from ome_zarr.format import FormatV04
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr.writer import write_image as ome_write_image
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel

from patchmorph_core.errors import InputError
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, random_rotation
from pipeline import ngff


def _image(shape=(30, 41, 52)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1000, shape).astype(np.uint16)


def test_image_round_trip_matches_in_memory_pyramid(tmp_path: Path) -> None:
    data = _image()
    grid = Grid.from_orientation(data.shape, (50, 40, 40), "psl")
    out = ngff.write_image(tmp_path / "a.zarr", data, grid, chunks=(16, 7, 9), n_levels=3)
    Image.from_zarr(zarr.open_group(str(out), mode="r"))  # NGFF 0.5 schema
    reference = MultiscaleImage.from_array(data, grid, n_levels=3)
    for backend in ("zarr", "tensorstore"):
        image = ngff.read_image(out, backend=backend)
        assert len(image.levels) == 3
        for level, ref in zip(image.levels, reference.levels, strict=True):
            values = np.asarray(
                level.array[:].read().result() if backend == "tensorstore" else level.array[:]
            )
            # levels >= 2 are built from the rounded uint16 level above: at most one grey value apart
            assert np.abs(values.astype(float) - np.rint(ref.array)).max() <= 1.0
            np.testing.assert_allclose(level.grid.affine, ref.grid.affine, atol=1e-9)
            assert level.grid.unit == "micrometer"
    nodes = list(Reader(parse_url(str(out)))())
    assert nodes[0].data[0].shape == data.shape and len(nodes[0].data) == 3


def test_scale_translation_agree_with_full_affine(tmp_path: Path) -> None:
    """NGFF 0.5 readers see scale/translation; composed with the direction they give our affine."""
    rotation = random_rotation(np.random.default_rng(1), 40.0)
    grid = Grid.from_spacing((12, 20, 24), (3.0, 1.0, 1.5), origin=(5, -7, 9), direction=rotation)
    out = ngff.write_image(tmp_path / "r.zarr", _image(grid.shape), grid, n_levels=3)
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    image = ngff.read_image(out)
    for dataset, level in zip(attrs["ome"]["multiscales"][0]["datasets"], image.levels, strict=True):
        scale, translation = (
            np.asarray(t[k])
            for t, k in zip(dataset["coordinateTransformations"], ("scale", "translation"), strict=True)
        )
        index = np.array([1.0, 2.0, 3.0])
        np.testing.assert_allclose(rotation @ (scale * index + translation), level.grid.index_to_world(index))


@pytest.mark.parametrize("edit", ["scale", "unit"])
def test_an_ngff_voxel_size_edited_by_another_tool_is_refused(tmp_path: Path, edit: str) -> None:
    """A store whose NGFF scale (every level's, tripled) or axes' unit (millimetre to micrometre) was edited after it
    was written disagrees with the project's own affine, which was read silently, ignoring the edit: one sentence
    naming both voxel sizes. The untouched store (rotated, anisotropic) is read."""
    import json

    rotation = random_rotation(np.random.default_rng(2), 30.0)
    grid = Grid.from_spacing((12, 20, 24), (0.3, 0.1, 0.15), origin=(5, -7, 9), direction=rotation, unit="millimeter")
    out = ngff.write_image(tmp_path / "r.zarr", _image(grid.shape), grid, n_levels=2)
    ngff.read_image(out)
    document = out / "zarr.json"
    metadata = json.loads(document.read_text())
    multiscale = metadata["attributes"]["ome"]["multiscales"][0]
    if edit == "scale":
        for dataset in multiscale["datasets"]:
            dataset["coordinateTransformations"][0]["scale"] = [3 * v for v in dataset["coordinateTransformations"][0]["scale"]]
    else:
        for axis in multiscale["axes"]:
            axis["unit"] = "micrometer"
    document.write_text(json.dumps(metadata))
    with pytest.raises(InputError, match=r"r\.zarr' has two voxel sizes that disagree: its NGFF scale says .* convert"):
        ngff.read_image(out)


def test_anisotropic_pyramid_becomes_isotropic(tmp_path: Path) -> None:
    grid = Grid.from_spacing((16, 256, 256), (200.0, 50.0, 50.0))
    out = ngff.write_image(tmp_path / "aniso.zarr", np.ones(grid.shape, np.float32), grid)
    spacings = [lv.grid.spacing for lv in ngff.read_image(out).levels]
    np.testing.assert_allclose(spacings[1], [200, 100, 100])
    np.testing.assert_allclose(spacings[2], [200, 200, 200])
    assert max(ngff.read_image(out).levels[-1].array.shape) <= ngff.COARSEST_MAX_SIZE


def test_an_8_bit_images_levels_keep_its_means_in_float32(tmp_path: Path) -> None:
    """A mask on 5 % of the voxels (uint8 0/1): its block means would round to nothing in uint8; a 16-bit
    image keeps its dtype, a label image its ids."""
    rng = np.random.default_rng(4)
    mask = (rng.random((24, 32, 40)) < 0.05).astype(np.uint8)
    grid = Grid.from_orientation(mask.shape, (50, 40, 40), "psl")
    image = ngff.read_image(ngff.write_image(tmp_path / "m.zarr", mask, grid, n_levels=3))
    assert image.levels[0].array.dtype == np.uint8
    for level in image.levels[1:]:
        values = np.asarray(level.array[:])
        assert values.dtype == np.float32
        assert values.mean() == pytest.approx(mask.mean(), rel=1e-5)
    wide = ngff.read_image(ngff.write_image(tmp_path / "w.zarr", mask.astype(np.uint16) * 900, grid, n_levels=2))
    assert wide.levels[1].array.dtype == np.uint16
    labels = ngff.read_image(ngff.write_image(tmp_path / "l.zarr", mask * 7, grid, labels=True, n_levels=2))
    assert labels.levels[1].array.dtype == np.uint8


def test_writing_an_image_shows_its_bars_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``progress=False`` (the switch of the other long steps; flows pass it) silences the bars of level 0 and of
    the pyramid, in the plain and the resumable write and in a field's; by default they are shown."""
    values = np.random.default_rng(5).random((40, 150, 90)).astype(np.float32)
    grid = Grid.from_spacing(values.shape, (50.0, 20.0, 30.0))
    for name, fingerprint in (("plain", None), ("resumable", {"input": "test"})):
        ngff.write_image(tmp_path / f"{name}.zarr", values, grid, n_levels=2, fingerprint=fingerprint, progress=False)
        assert capsys.readouterr().err == "", name
        ngff.write_image(tmp_path / f"{name}_bar.zarr", values, grid, n_levels=2, fingerprint=fingerprint)
        shown = capsys.readouterr().err
        assert "writing" in shown and "pyramid level 1" in shown, (name, shown)
    assert len(ngff.read_image(tmp_path / "resumable.zarr").levels) == 2
    field = np.stack([values] * 3)
    ngff.write_field(tmp_path / "field.zarr", field, grid, uncertainty=values, n_levels=2, progress=False)
    assert capsys.readouterr().err == ""


def test_labels_keep_dtype_and_values(tmp_path: Path) -> None:
    labels = np.random.default_rng(2).choice(np.array([0, 7, 1000], np.uint32), size=(20, 24, 28))
    grid = Grid.from_spacing(labels.shape, (1.0, 1.0, 1.0), unit="millimeter")
    out = ngff.write_image(tmp_path / "l.zarr", labels, grid, labels=True, n_levels=2)
    ImageLabel.from_zarr(zarr.open_group(str(out), mode="r"))
    image = ngff.read_image(out)
    coarse = np.asarray(image.levels[1].array[:])
    assert coarse.dtype == np.uint32 and set(np.unique(coarse)) <= {0, 7, 1000}
    np.testing.assert_array_equal(coarse, labels[::2, ::2, ::2])


def test_field_round_trip_with_uncertainty(tmp_path: Path) -> None:
    grid = Grid.from_orientation((6, 7, 8), (100, 100, 100), "asr")
    field = np.random.default_rng(3).normal(size=(3, *grid.shape)).astype(np.float32)
    spread = np.abs(field[0])
    meta = {"fixed": "f.zarr", "moving": "m.zarr", "model": "default.pt", "config": {"seed": 1}}
    out = ngff.write_field(
        tmp_path / "field.zarr",
        da.from_array(field, chunks=(3, 4, 4, 4)),
        grid,
        metadata=meta,
        uncertainty=spread,
    )
    Image.from_zarr(zarr.open_group(str(out), mode="r"))
    array, field_grid, read_meta = ngff.read_field(out)
    np.testing.assert_array_equal(np.asarray(array[:]), field)
    np.testing.assert_allclose(field_grid.affine, grid.affine)
    assert read_meta["components"] == ["z", "y", "x"] and read_meta["displacement_unit"] == "micrometer"
    assert read_meta["fixed"] == "f.zarr" and read_meta["config"] == {"seed": 1}
    assert "x + u(x)" in read_meta["direction"]
    uncertainty = ngff.read_image(out / read_meta["uncertainty"])
    np.testing.assert_array_equal(np.asarray(uncertainty.levels[0].array[:]), spread)
    with pytest.raises(InputError, match="not a PatchMorph displacement field"):
        ngff.read_field(out / "uncertainty")


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    grid = Grid.from_spacing((4, 5, 6), (1, 1, 1))
    out = ngff.write_image(tmp_path / "o.zarr", np.zeros(grid.shape, np.uint8), grid)
    with pytest.raises(InputError, match="already exists"):
        ngff.write_image(out, np.ones(grid.shape, np.uint8), grid)
    ngff.write_image(out, np.ones(grid.shape, np.uint8), grid, overwrite=True)
    assert np.asarray(ngff.read_image(out).levels[0].array[:]).min() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]  # no temporary leftovers


def test_chunked_write_once_and_completion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each write unit (a shard here) is written by one task; the output is complete only when finished."""
    monkeypatch.setattr(ngff, "SHARD_THRESHOLD_BYTES", 0)
    data = _image((20, 33, 40)).astype(np.float32)
    grid = Grid.from_spacing(data.shape, (2.0, 1.0, 1.0))
    path = tmp_path / "c.zarr"
    array = ngff.create_image_array(path, data.shape, grid, np.float32, chunks=(4, 4, 4))
    block = ngff.write_block(array)
    assert array.shards is not None and block == (16, 16, 16)
    starts = [range(0, n, b) for n, b in zip(data.shape, block, strict=True)]
    boxes = [
        tuple(slice(s, s + b) for s, b in zip(st, block, strict=True))
        for st in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, 3)
    ]
    for box in boxes[:3]:
        array[box] = data[box]
    with pytest.raises(InputError, match="incomplete"):
        ngff.read_image(path)
    resumed = ngff.create_image_array(path, data.shape, grid, np.float32, chunks=(4, 4, 4), resume=True)
    for box in boxes[3:]:
        resumed[box] = data[box]
    ngff.finish_image(path, n_levels=2)
    image = ngff.read_image(path, backend="tensorstore")
    np.testing.assert_array_equal(image.levels[0].array.read().result(), data)
    with pytest.raises(InputError, match="cannot resume"):
        ngff.create_image_array(path, data.shape, grid, np.float32, resume=True)


def _write_v04(path: Path) -> np.ndarray:
    data = np.arange(8 * 10 * 12, dtype=np.uint16).reshape(1, 8, 10, 12)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    ome_write_image(
        data,
        root,
        scale_factors=[2],
        fmt=FormatV04(),
        axes=["c", "z", "y", "x"],
        scale={"c": 1.0, "z": 3.0, "y": 2.0, "x": 2.0},
        axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"},
    )
    return data[0]


def test_read_ngff_04_from_ome_zarr_py(tmp_path: Path) -> None:
    data = _write_v04(tmp_path / "v04.zarr")
    for backend in ("zarr", "tensorstore"):
        image = ngff.read_image(tmp_path / "v04.zarr", backend=backend)
        level0 = image.levels[0].array
        values = level0.read().result() if isinstance(level0, ts.TensorStore) else np.asarray(level0)
        np.testing.assert_array_equal(values, data)
        np.testing.assert_allclose(image.grid.spacing, [3, 2, 2])
        assert image.unit == "micrometer" and image.levels[1].array.shape[-2:] == (5, 6)


def test_multiscale_level_transforms_apply_after_the_datasets(tmp_path: Path) -> None:
    """NGFF's multiscale-level scale and translation act on the dataset's world coordinates: the voxel size is the
    product of the two scales, and the dataset's translation is scaled too (world = g_s * (s * i + t) + g_t)."""
    group = zarr.open_group(str(tmp_path / "scaled.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(4, 5, 6), dtype="u1")
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
            "datasets": [
                {
                    "path": "0",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [2.0, 3.0, 4.0]},
                        {"type": "translation", "translation": [10.0, 20.0, 30.0]},
                    ],
                }
            ],
            "coordinateTransformations": [
                {"type": "scale", "scale": [0.5, 2.0, 0.25]},
                {"type": "translation", "translation": [1.0, -1.0, 2.0]},
            ],
        }
    ]
    grid = ngff.read_image(tmp_path / "scaled.zarr").grid
    np.testing.assert_allclose(grid.spacing, [1.0, 6.0, 1.0])
    np.testing.assert_allclose(grid.origin, [6.0, 39.0, 9.5])


def test_bad_ngff_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        ngff.read_image(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(InputError, match="no NGFF 'multiscales'"):
        ngff.read_image(tmp_path / "plain.zarr")
    group = zarr.open_group(str(tmp_path / "axes.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(2, 3, 4), dtype="u1")
    group.attrs["multiscales"] = [
        {"version": "0.4", "axes": [{"name": "a"}, {"name": "y"}, {"name": "x"}], "datasets": [{"path": "0"}]}
    ]
    with pytest.raises(InputError, match="unknown|axes"):
        ngff.read_image(tmp_path / "axes.zarr")
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": ["z", "y", "x"],
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.0, 1.0, 1.0]}]}
            ],
        }
    ]
    with pytest.raises(InputError, match="voxel size"):
        ngff.read_image(tmp_path / "axes.zarr")


# -- anatomical orientation (RFC-4) and fields in their grid's frame ---------------------------------------------------
def test_rfc4_orientation_alone_gives_back_the_grid(tmp_path: Path) -> None:
    """Every oriented output's spatial axes carry RFC-4 orientations; scale, translation and those alone
    (the project's affine removed) give the same index -> world map."""
    data = _image((12, 9, 15))
    for code in ("psl", "asr", "ipl", "lia"):
        grid = Grid.from_orientation(data.shape, (50, 40, 45), code).translated([10.0, -20.0, 30.0])
        out = ngff.write_image(tmp_path / f"{code}.zarr", data, grid)
        Image.from_zarr(zarr.open_group(str(out), mode="r"))
        assert ngff.image_orientation(out) == code
        group = zarr.open_group(str(out), mode="r+")
        attrs = dict(group.attrs)
        attrs["patchmorph"] = {
            k: v for k, v in attrs["patchmorph"].items() if k != "coordinateTransformations"
        }
        group.attrs.put(attrs)
        np.testing.assert_allclose(ngff.read_image(out).grid.affine, grid.affine, atol=1e-9)
    rotated = Grid.from_orientation(data.shape, (50, 40, 45), "psl").transformed(
        np.block(
            [[random_rotation(np.random.default_rng(1), 20.0), np.zeros((3, 1))], [np.zeros((1, 3)), 1.0]]
        )
    )
    oblique = ngff.write_image(tmp_path / "oblique.zarr", data, rotated)
    assert ngff.image_orientation(oblique) is None  # no code describes it; the project's affine does
    np.testing.assert_allclose(ngff.read_image(oblique).grid.affine, rotated.affine)


def _write_foreign(path: Path, data: np.ndarray, spacing: tuple[float, float, float], scale_factors: list[int]) -> Path:
    """``data`` ``(Z, Y, X)`` as ome-zarr-py writes it (NGFF 0.4, no ``patchmorph`` attributes): its pyramid of
    ``scale_factors`` (anti-aliased, y and x halved only; none: one level), voxel size ``spacing`` µm."""
    ome_write_image(
        data, zarr.open_group(str(path), mode="w", zarr_format=2), axes="zyx", fmt=FormatV04(),
        scale_factors=scale_factors, scale=dict(zip("zyx", spacing, strict=True)),
        axes_units={a: "micrometer" for a in "zyx"},
    )  # fmt: skip
    return path


def test_register_and_warp_treat_another_tools_images_as_their_converted_copies(
    tmp_path: Path, examples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``register`` on OME-Zarr images of ome-zarr-py (the fixed one with its pyramid, the moving one a single level)
    gives exactly the field of the same images converted by PatchMorph, ``warp`` of such an image onto a coarser grid
    the converted copy's values, and neither writes anything beside them; an image whose PatchMorph pyramid would not
    fit in memory is refused before any work, naming ``convert``."""
    import tifffile
    from typer.testing import CliRunner

    from patchmorph.cli import app
    from pipeline import register
    from pipeline.demo import ExampleFiles
    from pipeline.importers import convert

    brain = tifffile.imread(ExampleFiles.from_dir(examples).brain)  # 50 x 40 x 40 µm
    z, y, x = (n // 4 * 4 for n in brain.shape)
    brain = brain[:z, :y, :x].reshape(z // 4, 4, y // 4, 4, x // 4, 4).mean(axis=(1, 3, 5)).astype(np.uint16)
    moving = np.roll(brain, (2, -1, 3), axis=(0, 1, 2))  # anisotropic 200 x 160 x 160 µm, not cubic
    foreign = {
        "fixed": _write_foreign(tmp_path / "in" / "fixed.zarr", brain, (200.0, 160.0, 160.0), [2, 4]),
        "moving": _write_foreign(tmp_path / "in" / "moving.zarr", moving, (200.0, 160.0, 160.0), []),
    }
    converted = {role: convert(path, tmp_path / f"{role}.ome.zarr") for role, path in foreign.items()}
    fields = {}
    for name, images in (("foreign", foreign), ("converted", converted)):
        out = tmp_path / f"{name}_field.ome.zarr"
        result = CliRunner().invoke(app, ["register", "--fixed", str(images["fixed"]), "--moving",
                                          str(images["moving"]), "--out", str(out), "--field-spacing", "320um"])  # fmt: skip
        assert result.exit_code == 0, result.output
        fields[name] = np.asarray(ngff.read_field(out)[0][:])
    assert np.abs(fields["converted"]).max() > 50.0  # the shift was found: a field of hundreds of µm
    np.testing.assert_array_equal(fields["foreign"], fields["converted"])
    coarse = ngff.read_image(converted["fixed"]).grid.resampled(500.0)  # the pyramid's level 1 is read for it
    target = ngff.write_image(tmp_path / "coarse.ome.zarr", np.ones(coarse.shape, np.uint16), coarse)
    warped = {}
    for name, images in (("foreign", foreign), ("converted", converted)):
        out = tmp_path / f"{name}_warped.ome.zarr"
        result = CliRunner().invoke(app, ["warp", "--field", str(tmp_path / "converted_field.ome.zarr"), "--moving",
                                          str(images["moving"]), "--target", str(target), "--out", str(out)])  # fmt: skip
        assert result.exit_code == 0, result.output
        warped[name] = np.asarray(ngff.read_image(out).levels[0].array[:])
    np.testing.assert_array_equal(warped["foreign"], warped["converted"])
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["fixed.zarr", "moving.zarr"]

    monkeypatch.setattr(register, "IMAGES_IN_MEMORY_BYTES", 700_000)  # room for one of the two (0.49 MB each)
    out = tmp_path / "refused.ome.zarr"
    result = CliRunner().invoke(app, ["register", "--fixed", str(foreign["fixed"]), "--moving", str(foreign["moving"]),
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"the moving image {foreign['moving']} was written by another tool" in result.output
    assert f"convert it first ('patchmorph convert {foreign['moving']} OUT.ome.zarr'" in result.output
    assert not out.exists()


def test_an_image_without_orientation_is_said_so_and_gets_no_rfc4(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import tifffile

    from pipeline.importers import convert

    tif = tmp_path / "brain.tif"
    tifffile.imwrite(tif, _image((6, 7, 8)))
    with caplog.at_level("WARNING"):
        plain = convert(tif, tmp_path / "plain.zarr", voxel_size=(5, 4, 4))
    assert "carries no anatomical orientation" in caplog.text and "--orientation" in caplog.text
    assert ngff.image_orientation(plain) is None
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert ngff.warn_without_orientation(plain, "fixed")
        oriented = convert(tif, tmp_path / "oriented.zarr", voxel_size=(5, 4, 4), orientation="psl")
        assert not ngff.warn_without_orientation(oriented, "fixed")
    assert caplog.text.count("carries no anatomical orientation") == 1
    assert ngff.image_orientation(oriented) == "psl"


def test_field_is_stored_along_its_grid_axes_and_read_in_world_components(tmp_path: Path) -> None:
    grid = Grid.from_orientation((5, 6, 7), (2.0, 3.0, 4.0), "psl", unit="millimeter")
    world = np.random.default_rng(2).normal(size=(3, *grid.shape)).astype(np.float32)
    out = ngff.write_field(tmp_path / "f.zarr", world, grid)
    stored = np.asarray(zarr.open_group(str(out), mode="r")["0"][...])
    np.testing.assert_allclose(stored, np.tensordot(grid.direction.T, world, axes=(1, 0)), atol=1e-6)
    np.testing.assert_allclose(stored[0], world[1])  # psl: z runs toward anterior, world component 1
    array, read_grid, meta = ngff.read_field(out)
    assert meta["displacement_frame"] == ngff.FIELD_FRAME and ngff.image_orientation(out) == "psl"
    np.testing.assert_allclose(np.asarray(array), world, atol=1e-6)
    np.testing.assert_allclose(array[1, 2:4, :, 3], world[1, 2:4, :, 3], atol=1e-6)
    np.testing.assert_allclose(read_grid.affine, grid.affine)
    chunked = ngff.create_image_array(
        tmp_path / "g.zarr",
        grid.shape,
        grid,
        np.float32,
        (2, 3, 4),
        channels=3,
        extra_attrs=ngff.field_metadata(grid),
    )
    chunked[:, 0:2, 0:3, 0:4] = world[:, 0:2, 0:3, 0:4]
    np.testing.assert_allclose(chunked[:, 0:2, 0:3, 0:4], world[:, 0:2, 0:3, 0:4], atol=1e-6)
    with pytest.raises(ValueError, match="all three components"):
        chunked[0, 0:2] = world[0, 0:2]


@pytest.mark.parametrize("spelling", ["µm", "um", "micron"])
def test_an_axis_unit_in_another_tools_spelling_is_read_as_its_length(tmp_path: Path, spelling: str) -> None:
    """Axes whose unit says ``µm`` (not NGFF's ``micrometer``), as some writers spell it, read as micrometres; a unit
    that is no length is refused naming the image."""
    path = tmp_path / "image.zarr"
    ome_write_image(
        _image((6, 7, 8)), zarr.open_group(str(path), mode="w", zarr_format=2), axes="zyx", fmt=FormatV04(),
        scale_factors=[], scale={"z": 50.0, "y": 40.0, "x": 30.0},
    )  # fmt: skip
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs)
    for axis in attrs["multiscales"][0]["axes"]:
        axis["unit"] = spelling
    group.attrs.update(attrs)
    grid = ngff.read_image(path).grid
    assert grid.unit == "micrometer"
    np.testing.assert_allclose(grid.spacing, [50.0, 40.0, 30.0])
    for axis in attrs["multiscales"][0]["axes"]:
        axis["unit"] = "pixel"
    group.attrs.update(attrs)
    with pytest.raises(InputError, match=r"image\.zarr' gives its z, y, x axes the unit 'pixel', which is no length unit"):
        ngff.read_image(path)


def test_a_bioformats2raw_store_given_as_its_top_folder_is_its_single_series(tmp_path: Path) -> None:
    """A bioformats2raw store's top folder (``brain.zarr``, whose image is ``brain.zarr/0``) reads as its one series,
    each channel on its own; a store of several series is refused naming them; the series folder is named after
    its store (``brain``, not ``0``)."""
    from bioformats_stores import write_bioformats2raw

    data = _image((6, 7, 8)).astype(np.uint16)
    store = write_bioformats2raw(tmp_path / "brain.zarr", [np.stack([data, data[::-1]])])
    for channel, expected in ((0, data), (1, data[::-1])):
        for path in (store, store / "0"):
            level = ngff.read_channel(path, channel)
            np.testing.assert_array_equal(np.asarray(level.array), expected)
            np.testing.assert_allclose(level.grid.spacing, [50.0, 40.0, 40.0])
    with pytest.raises(InputError, match="which holds 2: give 0 to 1"):
        ngff.read_channel(store, 2)
    several = write_bioformats2raw(tmp_path / "plate.zarr", [np.stack([data]), np.stack([data])])
    with pytest.raises(InputError, match=r"holds 2 image series \(.*plate.zarr/0, .*plate.zarr/1\)"):
        ngff.read_image(several)
    assert ngff.series_store(store / "0") == store and ngff.series_store(store) == store
