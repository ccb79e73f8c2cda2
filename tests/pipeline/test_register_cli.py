"""`patchmorph register` / `warp` on a real cluster: outputs, chunked warping = in-memory warping, bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from typer.testing import CliRunner

from patchmorph.cli import app
from patchmorph_core.config import InferenceConfig
from patchmorph_core.displacement import FieldDisplacement, InverseDisplacement
from patchmorph_core.warping import warp_to_grid
from pipeline.ngff import read_field, read_image, write_field, write_image
from pipeline.warp import warp_files

runner = CliRunner()


@pytest.fixture(scope="module")
def analytic_field(
    tmp_path_factory: pytest.TempPathFactory, pair_and_config: tuple[Path, Path, InferenceConfig]
) -> Path:
    """A smooth, fold-free field (translation + sine) on a 2 mm grid over the fixed image."""
    fixed, moving, _ = pair_and_config
    grid = read_image(fixed).grid.resampled(2.0)
    points = grid.points()
    field = np.stack(
        [
            1.0 + 1.5 * np.sin(points[..., 1] / 9.0),
            -0.5 + np.cos(points[..., 2] / 11.0),
            0.8 * np.sin(points[..., 0] / 7.0),
        ]
    ).astype(np.float32)
    path = tmp_path_factory.mktemp("field") / "analytic.zarr"
    return write_field(path, field, grid, metadata={"fixed": str(fixed), "moving": str(moving)})


def test_chunked_warp_equals_in_memory(
    tmp_path: Path,
    analytic_field: Path,
    dask_scheduler: str,
    pair_and_config: tuple[Path, Path, InferenceConfig],
) -> None:
    fixed, moving, _ = pair_and_config
    array, grid, _ = read_field(analytic_field)
    forward = FieldDisplacement(np.asarray(array[:]), grid)
    fixed_grid, moving_img = read_image(fixed).grid, read_image(moving)

    record = warp_files(
        analytic_field, moving, tmp_path / "w.zarr", chunk_size=17, scheduler=dask_scheduler, progress=False
    )
    expected = warp_to_grid(moving_img, forward, fixed_grid)
    assert record.chunks == 3 * 3 * 2 and record.inverse_max_error is None
    np.testing.assert_allclose(read_image(record.out).levels[0].array[:], expected, atol=1e-5)  # float32 indices

    labels = (np.asarray(moving_img.levels[0].array[:]) * 7).astype(np.uint16)
    label_path = write_image(tmp_path / "labels.zarr", labels, moving_img.grid, labels=True)
    record = warp_files(
        analytic_field,
        label_path,
        tmp_path / "wl.zarr",
        labels=True,
        chunk_size=40,
        scheduler=dask_scheduler,
        progress=False,
    )
    out = np.asarray(read_image(record.out).levels[0].array[:])
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, warp_to_grid(read_image(label_path), forward, fixed_grid, "vote"))
    assert zarr.open_group(str(record.out), mode="r").attrs["patchmorph"]["warped"]["label_interpolation"] == "vote"
    record = warp_files(
        analytic_field, label_path, tmp_path / "wn.zarr", labels=True, chunk_size=40, scheduler=dask_scheduler,
        progress=False, label_interpolation="nearest",
    )  # fmt: skip
    nearest = np.asarray(read_image(record.out).levels[0].array[:])
    np.testing.assert_array_equal(nearest, warp_to_grid(read_image(label_path), forward, fixed_grid, "nearest"))
    assert (nearest != out).sum() > 10

    record = warp_files(
        analytic_field,
        fixed,
        tmp_path / "inv.zarr",
        inverse=True,
        chunk_size=17,
        scheduler=dask_scheduler,
        progress=False,
    )
    expected = warp_to_grid(read_image(fixed), InverseDisplacement(forward, 20), moving_img.grid)
    np.testing.assert_allclose(read_image(record.out).levels[0].array[:], expected, atol=1e-5)
    assert record.direction == "inverse" and record.inverse_max_error < 1e-3 * 2.0


def test_register_and_warp_commands(
    tmp_path: Path, dask_scheduler: str, pair_and_config: tuple[Path, Path, InferenceConfig]
) -> None:
    fixed, moving, config = pair_and_config
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    field = tmp_path / "field.zarr"
    common = ["--chunk-size", "17", "--scheduler", dask_scheduler]
    result = runner.invoke(
        app,
        [
            "register",
            "--fixed",
            str(fixed),
            "--moving",
            str(moving),
            "--out",
            str(field),
            "--config",
            str(config_path),
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"wrote displacement field {field}" in result.output and "uncertainty" in result.output
    assert read_field(field)[1].unit == "millimeter"

    warped = tmp_path / "warped.zarr"
    result = runner.invoke(
        app, ["warp", "--field", str(field), "--moving", str(moving), "--out", str(warped), *common]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote forward-warped image {warped}" in result.output
    assert read_image(warped).grid.shape == read_image(fixed).grid.shape

    again = runner.invoke(
        app, ["warp", "--field", str(field), "--moving", str(moving), "--out", str(warped), *common]
    )
    assert again.exit_code == 2 and "already exists" in again.output
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("important")
    for command in (
        ["warp", "--field", str(field), "--moving", str(moving)],
        ["register", "--fixed", str(fixed), "--moving", str(moving), "--config", str(config_path)],
    ):
        refused = runner.invoke(app, [*command, "--out", str(mine), "--overwrite", *common])
        assert refused.exit_code == 2 and "is a folder that is not a Zarr store" in refused.output, refused.output
        assert (mine / "notes.txt").read_text() == "important" and (mine / "sub").is_dir()

    # a label image warped as an image would blend its ids into values that are no label: refused up front
    moving_image = read_image(moving)
    labels = tmp_path / "labels.zarr"
    ids = (np.asarray(moving_image.levels[0].array) > np.median(moving_image.levels[0].array)).astype(np.uint16)
    write_image(labels, ids, moving_image.grid, labels=True)
    refused = runner.invoke(
        app, ["warp", "--field", str(field), "--moving", str(labels), "--out", str(tmp_path / "w.zarr"), *common]
    )
    assert refused.exit_code == 2 and "is a label image" in refused.output and "--labels" in refused.output
    assert not (tmp_path / "w.zarr").exists()
    warped_labels = tmp_path / "warped_labels.zarr"
    result = runner.invoke(
        app,
        ["warp", "--field", str(field), "--moving", str(labels), "--out", str(warped_labels), "--labels", *common],
    )
    assert result.exit_code == 0, result.output
    assert set(np.unique(np.asarray(read_image(warped_labels).levels[0].array)).tolist()) <= {0, 1}


def test_register_in_process_at_a_field_spacing_with_its_unit(
    tmp_path: Path, pair_and_config: tuple[Path, Path, InferenceConfig]
) -> None:
    """No --scheduler or --workers: threads of the command's own process; --field-spacing sets the field grid
    (in the fixed image's unit) and the stages, and the command says what it used."""
    fixed, moving, config = pair_and_config
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_copy(update={"n_stages": None}).model_dump(mode="json")))
    field = tmp_path / "field.zarr"
    args = ["register", "--fixed", str(fixed), "--moving", str(moving), "--out", str(field), "--config", str(config_path)]
    keep = "--accept-quality"  # the tiny untrained network may leave the pair worse than its start (exit 3)
    result = runner.invoke(app, [*args, "--field-spacing", "2500 µm", keep])
    assert result.exit_code == 0, result.output
    _, grid, meta = read_field(field)
    assert grid.unit == "millimeter" and np.allclose(grid.spacing, 2.5)
    assert meta["field_spacing"]["source"] == "given" and meta["field_spacing"]["value"] == pytest.approx(2.5)
    # which weights made the field: their path and the hash of their bytes (a model retrained into one file)
    weights = meta["model"]["weights_identity"]
    assert weights["path"] == str(Path(config.weights).resolve())
    assert weights["sha256"] == hashlib.sha256(Path(config.weights).read_bytes()).hexdigest()
    assert "field spacing 2.5 millimeter (given: 2500 µm)" in result.output and "dashboard" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "field.zarr"]  # no run folder left
    coarse = tmp_path / "coarse.zarr"
    coarser = runner.invoke(
        app, [*args[:5], "--out", str(coarse), "--config", str(config_path), "--field-spacing", "0.5cm", keep]
    )
    assert coarser.exit_code == 0, coarser.output
    # twice the spacing: one stage less, the whole-brain stage 0 alone (the finer run skips it only after an
    # affine start that the stage check kept)
    fine_passes = list(meta["field_spacing"]["passes"])
    assert fine_passes == (["stage1"] if meta["initial_alignment"]["accepted"] else ["stage0", "stage1"])
    assert read_field(coarse)[2]["field_spacing"]["passes"] == {"stage0": pytest.approx(5.0)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fixed": "missing.zarr"}, "fixed image"),
        ({"spacing": "3"}, "--field-spacing '3' is not a length with a unit"),
        ({"spacing": "3 s"}, "'s' is not a length unit"),
        ({"chunk": "0"}, "--chunk-size 0 is invalid"),
        ({"moving": "nan.zarr"}, "NaN"),
        ({"scheduler": "nonsense"}, "neither a YAML file"),
    ],
)
def test_register_bad_input_fails_fast(
    tmp_path: Path, change: dict[str, str], message: str, pair_and_config: tuple[Path, Path, InferenceConfig]
) -> None:
    fixed, moving, config = pair_and_config
    image = read_image(fixed)
    nan = np.asarray(image.levels[0].array[:]).copy()
    nan[3, 4, 5] = np.nan
    write_image(tmp_path / "nan.zarr", nan, image.grid)
    args = {
        "fixed": str(fixed),
        "moving": str(moving),
        "chunk": "17",
        "scheduler": "configs/cluster/local.yaml",
        "spacing": "2mm",
    }
    args.update({k: str(tmp_path / v) if k in ("fixed", "moving") else v for k, v in change.items()})
    result = runner.invoke(
        app,
        ["register", "--fixed", args["fixed"], "--moving", args["moving"], "--out", str(tmp_path / "f.zarr"),
         "--weights", str(config.weights), "--chunk-size", args["chunk"], "--scheduler", args["scheduler"],
         "--field-spacing", args["spacing"]],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "f.zarr").exists()


def test_a_fixed_image_thinner_than_two_field_voxels_is_refused_in_one_sentence(
    tmp_path: Path, pair_and_config: tuple[Path, Path, InferenceConfig]
) -> None:
    """Two planes of 1.2 mm under a 2.5 mm field: one field voxel across, where the registration crashed in the
    polish (torch.gradient: a traceback) and a single plane was refused as "does not overlap ...: check both images'
    voxel sizes, units and orientation", which were right. Now one sentence names the thickness, before the field."""
    fixed, moving, config = pair_and_config
    image = read_image(fixed)
    planes = np.asarray(image.levels[0].array[:])[16:18]
    grid = image.grid
    thin = type(grid)(planes.shape, grid.affine, grid.unit)
    write_image(tmp_path / "thin.zarr", planes, thin)
    result = runner.invoke(
        app,
        ["register", "--fixed", str(tmp_path / "thin.zarr"), "--moving", str(moving), "--out", str(tmp_path / "f.zarr"),
         "--weights", str(config.weights), "--field-spacing", "2.5mm", "--allow-size-mismatch", "--accept-orientation"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "is 2 voxel(s) of 1.2 millimeter thick along its array axis 0" in text, text
    assert "a single section or a few planes cannot be registered in 3-D" in text and "Traceback" not in text
    assert not (tmp_path / "f.zarr").exists()
