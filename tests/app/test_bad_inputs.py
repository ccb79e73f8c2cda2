"""Bad and unlucky input, table-driven, over every command of the command line (issue 22.7).

Each case runs the real command (in process, through the typer app) on small files prepared once per
module, and asserts three things:

* the exit code (2: refused input, 1: an operating-system error, 3: a result that failed its checks);
* exactly one ``error:`` line on stderr, matching the case's pattern, and no traceback;
* nothing lost or half-finished: every input file is byte-for-byte unchanged, and no output of the case is
  marked complete (an output that existed before the case is unchanged).

The flows' bad-input cases are in ``tests/flows/test_flow_bad_inputs.py``; together they are the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr
from scipy import ndimage
from typer.testing import CliRunner

from patchmorph.cli import app
from patchmorph_core.config import ModelConfig
from patchmorph_core.model import PatchMorph, save_checkpoint
from patchmorph_core.spatial import Grid
from pipeline.ngff import write_field, write_image

RUNNER = CliRunner()
THREADS = str(Path(__file__).resolve().parents[2] / "configs" / "flows" / "task_cluster.yaml")
"""In-process thread cluster: the cases that run work start no worker processes."""

SHAPE = (22, 26, 20)


def _volume() -> np.ndarray:
    """A textured ellipsoid (real structure for the checks), float32."""
    index = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"), axis=-1)
    inside = np.sqrt(((index / np.array([0.8, 0.65, 0.75])) ** 2).sum(-1)) < 1.0
    texture = ndimage.gaussian_filter(np.random.default_rng(7).random(SHAPE), 1.2)
    return (inside * (0.4 + texture)).astype(np.float32)


def _grid(unit: str = "millimeter") -> Grid:
    """Anisotropic, non-cubic, axis-permuted grid ('lia')."""
    return Grid.from_orientation(SHAPE, (2.0, 1.5, 2.5), "lia", unit=unit)


def _break(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every input of the cases, written once (the cases may not change any of them)."""
    w = tmp_path_factory.mktemp("world")
    data, grid = _volume(), _grid()
    write_image(w / "fixed.zarr", data, grid, chunks=(8, 8, 8))
    write_image(w / "moving.zarr", data, grid.translated(np.array([3.0, -2.0, 4.0])), chunks=(8, 8, 8))
    write_image(w / "zeros.zarr", np.zeros(SHAPE, np.float32), grid)
    nan = data.copy()
    nan[10, 12, 9] = np.nan
    write_image(w / "nan.zarr", nan, grid)
    speck = np.zeros(SHAPE, np.float32)
    speck[11, 13, 10] = 1.0
    write_image(w / "speck.zarr", speck, grid)
    write_image(w / "micrometre.zarr", data, _grid("micrometer"))  # the numbers of mm, read as µm: 1000x too small
    for name, how in (("lost_chunk", "delete"), ("flipped", "flip"), ("empty_chunk", "empty")):
        write_image(w / f"{name}.zarr", data, grid, chunks=(8, 8, 8))
        _break(w / f"{name}.zarr" / "0" / "c" / "1" / "1" / "1", how)
    write_image(w / "incomplete.zarr", data, grid)
    group = zarr.open_group(str(w / "incomplete.zarr"), mode="r+")
    group.attrs["patchmorph"] = {**dict(group.attrs["patchmorph"]), "complete": False}
    labels = np.rint(data * 5).astype(np.uint16)
    write_image(w / "labels.zarr", labels, grid, labels=True)
    write_image(w / "float_labels.zarr", data * 5.3, grid)
    write_image(w / "labels_other_grid.zarr", labels, grid.translated(np.array([1.0, 0.0, 0.0])), labels=True)
    # a smooth field fixed -> moving, its damaged copies, and one that failed its quality checks
    field_grid = grid.resampled(4.0)
    u = np.broadcast_to(np.array([3.0, -2.0, 4.0], np.float32)[:, None, None, None], (3, *field_grid.shape))
    meta = {"fixed": str(w / "fixed.zarr"), "moving": str(w / "moving.zarr")}
    for name in ("field", "field_flipped", "field_lost", "field_failed", "field_incomplete"):
        write_field(w / f"{name}.zarr", np.ascontiguousarray(u), field_grid, metadata=meta, chunks=(4, 4, 4))
    _break(w / "field_flipped.zarr" / "0" / "c" / "0" / "0" / "1" / "0", "flip")
    _break(w / "field_lost.zarr" / "0" / "c" / "0" / "1" / "0" / "1", "delete")
    for name, extra in (
        ("field_failed", {"complete": False, "status": "failed_quality", "quality": {"failures": ["12 % folded"]}}),
        ("field_incomplete", {"complete": False}),
    ):
        group = zarr.open_group(str(w / f"{name}.zarr"), mode="r+")
        group.attrs["patchmorph"] = {**dict(group.attrs["patchmorph"]), **extra}
    # a target image whose level 0 claims 10^15 voxels (only its grid is read): no disk holds the warp
    write_image(w / "huge_target.zarr", np.zeros((2, 2, 2), np.uint8), Grid.from_spacing((2, 2, 2), (1, 1, 1)))
    level0 = w / "huge_target.zarr" / "0" / "zarr.json"
    level0.write_text(json.dumps({**json.loads(level0.read_text()), "shape": [100000, 100000, 100000]}))
    # model, configs, training
    torch.manual_seed(0)
    model = PatchMorph(ModelConfig(patch_size=16, n_stages=2, widths=(4, 8), affine_widths=(4, 8)))
    save_checkpoint(w / "tiny.pt", model)
    (w / "not_weights.pt").write_text("these are not weights")
    (w / "bad_config.yaml").write_text("overlap: 1.5\nno_such_setting: 3\n")
    train = {
        "data": {"kind": "pairs", "pairs": [["fixed.zarr", "moving.zarr"]], "spacing": None},
        "model": {"patch_size": 16, "n_stages": 2, "widths": [4, 8], "affine_widths": [4, 8]},
        "steps": 2,
        "checkpoint": str(w / "trained.pt"),
    }
    (w / "train.yaml").write_text(yaml.safe_dump(train))
    save_checkpoint(w / "trained.pt", model, step=2)
    (w / "train_over_input.yaml").write_text(yaml.safe_dump({**train, "checkpoint": str(w / "fixed.zarr")}))
    (w / "train_missing_data.yaml").write_text(
        yaml.safe_dump({**train, "data": {"kind": "pairs", "pairs": [["nowhere.zarr", "moving.zarr"]]}, "checkpoint": str(w / "new.pt")})
    )
    # files of other formats
    tiff = (data * 1000).astype(np.uint16)
    tifffile.imwrite(w / "brain.tif", tiff)
    raw = (w / "brain.tif").read_bytes()
    (w / "truncated.tif").write_bytes(raw[: len(raw) // 2])
    (w / "zero_length.tif").write_bytes(b"")
    (w / "notes.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)), str(w / "four_d.nii.gz"))
    (w / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    (w / "plain.zarr").mkdir()
    (w / "plain.zarr" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    (w / "local_cluster.yaml").write_text("kind: local\n")
    (w / "auth_bad.txt").write_text("no-colon-here\n")
    return w


def _mouse(world: Path) -> None:
    """The bundled brain block-averaged to 200x160x160 µm (psl) and the Allen template read as 'asr'
    instead of 'rsa' (the issue's wrong code)."""
    if (world / "atlas_asr.zarr").exists():
        return
    from patchmorph_core.source import downsample, downsampled_grid
    from pipeline.importers import load_nrrd

    examples = Path(__file__).resolve().parents[2] / "examples"
    brain = tifffile.imread(examples / "mouse_stp_brainreg" / "brain_50x40x40um_psl.tif").astype(np.float32)
    grid = Grid.from_orientation(brain.shape, (50.0, 40.0, 40.0), "psl")
    small = downsample(brain, (4, 4, 4))
    write_image(world / "brain_psl.zarr", small, downsampled_grid(grid, (4, 4, 4), small.shape))
    template, template_grid = load_nrrd(examples / "mouse_ccf" / "average_template_100.nrrd", orientation="asr")
    write_image(world / "atlas_asr.zarr", template.astype(np.float32), template_grid)


def _existing_output(world: Path, out: Path) -> None:
    write_image(out / "exists.zarr", _volume(), _grid())


def _stale_warp_run(world: Path, out: Path) -> None:
    """A warp's run folder left (kept, as an interrupted run leaves it) after its output was deleted, and the
    field registered again since: the records belong to another field and must not be reused."""
    field_copy = out / "field.zarr"
    shutil.copytree(world / "field.zarr", field_copy)
    result = RUNNER.invoke(
        app, ["warp", "--field", str(field_copy), "--moving", str(world / "moving.zarr"), "--out",
              str(out / "warped.zarr"), "--scheduler", THREADS, "--keep-run"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "warped.zarr.run").is_dir()
    shutil.rmtree(out / "warped.zarr")
    array, grid, meta = _read_field_raw(field_copy)
    write_field(field_copy, array + 0.5, grid, metadata=meta, overwrite=True)  # "register" rewrote the field


def _read_field_raw(path: Path) -> tuple[np.ndarray, Grid, dict]:
    from pipeline.ngff import read_field

    array, grid, meta = read_field(path)
    return np.asarray(array[:]), grid, {k: meta[k] for k in ("fixed", "moving")}


def _port_in_use(world: Path, out: Path) -> None:
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _SOCKETS.append(sock)
    (out / "port").write_text(str(sock.getsockname()[1]))


_SOCKETS: list = []


@dataclass(frozen=True)
class Case:
    """One bad input: the command's arguments (``{w}``: the inputs' folder, ``{o}``: this case's output folder,
    ``{port}``: a port set up by ``setup``), the exit code and the message pattern; ``outputs`` are the paths
    (relative to ``{o}``) that must not be marked complete."""

    id: str
    args: str
    code: int
    message: str
    outputs: tuple[str, ...] = ("out.zarr",)
    setup: Callable[[Path, Path], None] | None = None


W, OUT = "{w}", "{o}"
REG = f"register --fixed {W}/fixed.zarr --moving {W}/moving.zarr --weights {W}/tiny.pt --scheduler {THREADS}"
WARP = f"warp --field {W}/field.zarr --moving {W}/moving.zarr --scheduler {THREADS}"

CASES = [
    # -- convert ------------------------------------------------------------------------------------------------
    Case("convert-missing-input", f"convert {W}/nowhere.tif {OUT}/out.zarr --voxel-size 1 1 1", 2, r"input .*nowhere\.tif.* does not exist"),
    Case("convert-not-an-image", f"convert {W}/notes.txt {OUT}/out.zarr", 2, r"is not a supported image"),
    Case("convert-truncated-tiff", f"convert {W}/truncated.tif {OUT}/out.zarr --voxel-size 50 40 40", 2, r"truncated\.tif.* (cannot be read to its end|not a readable TIFF)"),
    Case("convert-zero-length-tiff", f"convert {W}/zero_length.tif {OUT}/out.zarr --voxel-size 50 40 40", 2, r"zero_length\.tif.* is not a readable TIFF"),
    Case("convert-tiff-without-voxel-size", f"convert {W}/brain.tif {OUT}/out.zarr", 2, r"voxel size"),
    Case("convert-zero-voxel-size", f"convert {W}/brain.tif {OUT}/out.zarr --voxel-size 0 40 40", 2, r"invalid voxel size"),
    Case("convert-negative-voxel-size", f"convert {W}/brain.tif {OUT}/out.zarr --voxel-size 50 -40 40", 2, r"invalid voxel size"),
    Case("convert-nan-voxel-size", f"convert {W}/brain.tif {OUT}/out.zarr --voxel-size nan 40 40", 2, r"invalid voxel size"),
    Case("convert-unknown-unit", f"convert {W}/brain.tif {OUT}/out.zarr --voxel-size 1 1 1 --unit furlong", 2, r"unknown unit 'furlong'"),
    Case("convert-bad-orientation", f"convert {W}/brain.tif {OUT}/out.zarr --voxel-size 1 1 1 --orientation xyz", 2, r"unknown orientation code 'xyz'"),
    Case("convert-output-exists", f"convert {W}/brain.tif {OUT}/exists.zarr --voxel-size 1 1 1", 2, r"exists\.zarr' already exists", ("exists.zarr",), _existing_output),
    Case("convert-output-is-input", f"convert {W}/fixed.zarr {W}/fixed.zarr --overwrite", 2, r"output .*fixed\.zarr is the input"),
    Case("convert-output-inside-input", f"convert {W}/fixed.zarr {W}/fixed.zarr/copy.zarr --overwrite", 2, r"output .*copy\.zarr lies inside the input .*fixed\.zarr"),
    Case("convert-output-folder-missing", f"convert {W}/brain.tif {OUT}/no/such/out.zarr --voxel-size 1 1 1", 2, r"output folder .* does not exist"),
    Case("convert-4d-nifti", f"convert {W}/four_d.nii.gz {OUT}/out.zarr", 2, r"4-D image"),
    Case("convert-corrupt-nifti", f"convert {W}/broken.nii.gz {OUT}/out.zarr", 2, r"broken\.nii\.gz"),
    Case("convert-zarr-lost-chunk", f"convert {W}/lost_chunk.zarr {OUT}/out.zarr", 2, r"chunk \(1, 1, 1\) of array '0' in .*lost_chunk\.zarr is missing"),
    Case("convert-zarr-flipped-chunk", f"convert {W}/flipped.zarr {OUT}/out.zarr", 2, r"chunk \(1, 1, 1\) of array '0' in .*flipped\.zarr is corrupt"),
    Case("convert-zarr-without-multiscales", f"convert {W}/plain.zarr {OUT}/out.zarr", 2, r"no NGFF 'multiscales' metadata"),
    Case("convert-incomplete-zarr", f"convert {W}/incomplete.zarr {OUT}/out.zarr", 2, r"incomplete output"),
    # -- register -----------------------------------------------------------------------------------------------
    Case("register-missing-fixed", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/fixed.zarr", f"{W}/nowhere.zarr"), 2, r"fixed image .*nowhere\.zarr does not exist"),
    Case("register-missing-moving", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/moving.zarr", f"{W}/nowhere.zarr"), 2, r"moving image .*nowhere\.zarr does not exist"),
    Case("register-out-is-fixed-with-overwrite", f"{REG} --out {W}/fixed.zarr --overwrite", 2, r"output .*fixed\.zarr is the fixed input .*\(nothing was written\)"),
    Case("register-out-inside-moving", f"{REG} --out {W}/moving.zarr/field.zarr --overwrite", 2, r"lies inside the moving input"),
    Case("register-out-contains-weights", f"{REG} --out {W} --overwrite", 2, r"output .* contains the (fixed|moving|weights) input"),
    Case("register-output-exists", f"{REG} --out {OUT}/exists.zarr", 2, r"exists\.zarr already exists: pass --overwrite", ("exists.zarr",), _existing_output),
    Case("register-output-folder-missing", f"{REG} --out {OUT}/no/out.zarr", 2, r"output folder .* does not exist"),
    Case("register-nifti-fixed", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/fixed.zarr", f"{W}/four_d.nii.gz"), 2, r"four_d\.nii\.gz' is a file, not an OME-Zarr folder: convert an image first with 'patchmorph convert'"),
    Case("register-constant-fixed", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/fixed.zarr", f"{W}/zeros.zarr"), 2, r"fixed image .*zeros\.zarr is constant \(every voxel is 0\)"),
    Case("register-nan-moving", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/moving.zarr", f"{W}/nan.zarr"), 2, r"moving image .*nan\.zarr contains NaN"),
    Case("register-empty-moving", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/moving.zarr", f"{W}/speck.zarr"), 2, r"moving image .*speck\.zarr is empty"),
    Case("register-wrong-unit", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/moving.zarr", f"{W}/micrometre.zarr"), 2, r"spans 0\.024 millimeter of tissue along .* but the fixed image 24 millimeter \(1000\.0x, more than 3x\): check both images' voxel size and unit"),
    Case("register-fixed-lost-chunk", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/fixed.zarr", f"{W}/lost_chunk.zarr"), 2, r"chunk \(1, 1, 1\) of array '0' in .*lost_chunk\.zarr is missing"),
    Case("register-moving-zero-length-chunk", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/moving.zarr", f"{W}/empty_chunk.zarr"), 2, r"chunk \(1, 1, 1\) of array '0' in .*empty_chunk\.zarr is corrupt"),
    Case("register-incomplete-fixed", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/fixed.zarr", f"{W}/incomplete.zarr"), 2, r"incomplete output"),
    Case("register-weights-not-a-checkpoint", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/tiny.pt", f"{W}/not_weights.pt"), 2, r"not_weights\.pt"),
    Case("register-weights-missing", f"{REG} --out {OUT}/out.zarr".replace(f"{W}/tiny.pt", f"{W}/nowhere.pt"), 2, r"nowhere\.pt"),
    Case("register-chunk-size-zero", f"{REG} --out {OUT}/out.zarr --chunk-size 0", 2, r"--chunk-size 0 is invalid"),
    Case("register-workers-zero", f"{REG} --out {OUT}/out.zarr --workers 0", 2, r"--workers 0 is invalid"),
    Case("register-bad-scheduler", f"{REG} --out {OUT}/out.zarr".replace(THREADS, "nonsense"), 2, r"neither a YAML file nor a scheduler address"),
    Case("register-missing-scheduler-yaml", f"{REG} --out {OUT}/out.zarr".replace(THREADS, f"{W}/nowhere.yaml"), 2, r"nowhere\.yaml"),
    Case("register-config-unknown-key", f"{REG} --out {OUT}/out.zarr --config {W}/bad_config.yaml", 2, r"no_such_setting"),
    Case("register-wrong-orientation-code", f"register --fixed {W}/brain_psl.zarr --moving {W}/atlas_asr.zarr --out {OUT}/out.zarr --scheduler {THREADS}", 2, r"atlas_asr\.zarr fits the fixed image .* clearly better with one orientation code changed, .* or the moving image's to '[rl]sa' instead of 'asr'", setup=lambda w, o: _mouse(w)),
    # -- warp -----------------------------------------------------------------------------------------------------
    Case("warp-missing-field", f"{WARP} --out {OUT}/out.zarr".replace(f"{W}/field.zarr", f"{W}/nowhere.zarr"), 2, r"field .*nowhere\.zarr does not exist"),
    Case("warp-field-is-an-image", f"{WARP} --out {OUT}/out.zarr".replace(f"{W}/field.zarr", f"{W}/fixed.zarr"), 2, r"is not a PatchMorph displacement field"),
    Case("warp-field-is-a-nifti-file", f"{WARP} --out {OUT}/out.zarr".replace(f"{W}/field.zarr", f"{W}/four_d.nii.gz"), 2, r"is a file, not an OME-Zarr folder: .*'patchmorph import-field'"),
    Case("warp-missing-moving", f"{WARP} --out {OUT}/out.zarr".replace(f"{W}/moving.zarr", f"{W}/nowhere.zarr"), 2, r"nowhere\.zarr does not exist"),
    Case("warp-unknown-label-interpolation", f"{WARP} --out {OUT}/out.zarr --labels --label-interpolation linear", 2, r"--label-interpolation 'linear' is unknown: give 'vote' or 'nearest'"),
    Case("warp-out-is-moving-with-overwrite", f"{WARP} --out {W}/moving.zarr --overwrite", 2, r"output .*moving\.zarr is the image input"),
    Case("warp-out-is-field", f"{WARP} --out {W}/field.zarr --overwrite", 2, r"output .*field\.zarr is the field input"),
    Case("warp-out-inside-field", f"{WARP} --out {W}/field.zarr/warped.zarr", 2, r"lies inside the field input"),
    Case("warp-output-exists", f"{WARP} --out {OUT}/exists.zarr", 2, r"exists\.zarr already exists", ("exists.zarr",), _existing_output),
    Case("warp-field-flipped-chunk", f"{WARP} --out {OUT}/out.zarr".replace(f"{W}/field.zarr", f"{W}/field_flipped.zarr"), 2, r"chunk \(0, 0, 1, 0\) of array '0' in .*field_flipped\.zarr is corrupt"),
    Case("warp-field-lost-chunk", f"{WARP} --out {OUT}/out.zarr".replace(f"{W}/field.zarr", f"{W}/field_lost.zarr"), 2, r"chunk \(0, 1, 0, 1\) of array '0' in .*field_lost\.zarr is missing"),
    Case("warp-field-failed-quality", f"{WARP} --out {OUT}/out.zarr".replace(f"{W}/field.zarr", f"{W}/field_failed.zarr"), 2, r"failed its quality checks \(12 % folded\): rerun register"),
    Case("warp-field-incomplete", f"{WARP} --out {OUT}/out.zarr".replace(f"{W}/field.zarr", f"{W}/field_incomplete.zarr"), 2, r"incomplete output"),
    Case("warp-moving-lost-chunk", f"{WARP} --out {OUT}/out.zarr".replace(f"{W}/moving.zarr", f"{W}/lost_chunk.zarr"), 2, r"lost_chunk\.zarr is missing"),
    Case("warp-missing-target", f"{WARP} --out {OUT}/out.zarr --target {W}/nowhere.zarr", 2, r"target image .*nowhere\.zarr does not exist"),
    Case("warp-no-space-for-output", f"{WARP} --out {OUT}/out.zarr --target {W}/huge_target.zarr", 2, r"the warped image .* needs about .* free: free some space or write elsewhere"),
    Case("warp-stale-run-folder", f"warp --field {OUT}/field.zarr --moving {W}/moving.zarr --out {OUT}/warped.zarr --scheduler {THREADS}", 2, r"warped\.zarr\.run belongs to a run with different field", ("warped.zarr",), _stale_warp_run),
    Case("warp-chunk-size-zero", f"{WARP} --out {OUT}/out.zarr --chunk-size 0", 2, r"--chunk-size 0 is invalid"),
    # -- evaluate ---------------------------------------------------------------------------------------------------
    Case("evaluate-float-labels", f"evaluate --labels-a {W}/labels.zarr --labels-b {W}/float_labels.zarr -o {OUT}/m.json", 2, r"label map .*float_labels\.zarr holds values that are not whole numbers", ("m.json",)),
    Case("evaluate-nan-image", f"evaluate --image-a {W}/fixed.zarr --image-b {W}/nan.zarr -o {OUT}/m.json", 2, r"--image-b .*nan\.zarr contains NaN", ("m.json",)),
    Case("evaluate-constant-image", f"evaluate --image-a {W}/zeros.zarr --image-b {W}/fixed.zarr -o {OUT}/m.json", 2, r"--image-a .*zeros\.zarr is constant", ("m.json",)),
    Case("evaluate-labels-on-other-grids", f"evaluate --labels-a {W}/labels.zarr --labels-b {W}/labels_other_grid.zarr", 2, r"lie on different grids", ()),
    Case("evaluate-one-label-map", f"evaluate --labels-a {W}/labels.zarr", 2, r"give both label maps", ()),
    Case("evaluate-nothing", "evaluate", 2, r"nothing to evaluate", ()),
    Case("evaluate-absent-label-set", f"evaluate --labels-a {W}/labels.zarr --labels-b {W}/labels.zarr --label-set 900,901", 2, r"hold none of the labels \[900, 901\]", ()),
    Case("evaluate-bad-label-set", f"evaluate --labels-a {W}/labels.zarr --labels-b {W}/labels.zarr --label-set two", 2, r"label set 'two' is invalid", ()),
    Case("evaluate-out-is-input", f"evaluate --labels-a {W}/labels.zarr --labels-b {W}/labels.zarr -o {W}/labels.zarr", 2, r"--out .*labels\.zarr is the --labels-a input", ()),
    Case("evaluate-field-lost-chunk", f"evaluate --field {W}/field_lost.zarr", 2, r"field_lost\.zarr is missing", ()),
    # -- train ------------------------------------------------------------------------------------------------------
    Case("train-negative-steps", f"train --config {W}/train.yaml --steps -1 --overwrite", 2, r"--steps -1 is invalid", ()),
    Case("train-zero-steps", f"train --config {W}/train.yaml --steps 0 --overwrite", 2, r"--steps 0 is invalid", ()),
    Case("train-existing-checkpoint", f"train --config {W}/train.yaml", 2, r"checkpoint .*trained\.pt already exists: pass --resume", ()),
    Case("train-resume-and-overwrite", f"train --config {W}/train.yaml --resume --overwrite", 2, r"contradict each other", ()),
    Case("train-missing-config", f"train --config {W}/nowhere.yaml", 2, r"nowhere\.yaml", ()),
    Case("train-checkpoint-is-an-input", f"train --config {W}/train_over_input.yaml --overwrite", 2, r"checkpoint .*fixed\.zarr is the data\.pairs\[0\]\[0\] input", ()),
    Case("train-missing-data", f"train --config {W}/train_missing_data.yaml", 2, r"training input .*nowhere\.zarr does not exist", ()),
    # -- server, cluster-script ---------------------------------------------------------------------------------------
    Case("server-port-out-of-range", f"server --port 70000 --home {OUT}/prefect", 2, r"--port 70000 is invalid", ()),
    Case("server-port-in-use", f"server --port {{port}} --home {OUT}/prefect", 2, r"port \d+ on 127\.0\.0\.1 is already in use", (), _port_in_use),
    Case("server-worker-limit-zero", f"server --worker-limit 0 --home {OUT}/prefect", 2, r"--worker-limit 0 is invalid", ()),
    Case("server-bad-auth-file", f"server --port 0 --auth-file {W}/auth_bad.txt --home {OUT}/prefect", 2, r"must hold one line 'user:password'", ()),
    Case("server-missing-auth-file", f"server --port 0 --auth-file {W}/nowhere.txt --home {OUT}/prefect", 2, r"auth file .*nowhere\.txt does not exist", ()),
    Case("cluster-script-not-slurm", f"cluster-script {W}/local_cluster.yaml", 2, r"has kind 'local': give a config with kind: slurm", ()),
    Case("cluster-script-missing", f"cluster-script {W}/nowhere.yaml", 2, r"nowhere\.yaml", ()),
]


def _digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file below ``root`` (the inputs), by relative path."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _complete(path: Path) -> bool:
    """True when ``path`` is an output marked complete (a Zarr group) or any other written file."""
    if not path.exists():
        return False
    if (path / "zarr.json").is_file():
        return bool(json.loads((path / "zarr.json").read_text())["attributes"].get("patchmorph", {}).get("complete"))
    return True


def test_the_suite_is_large_enough() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    if case.setup is not None:
        case.setup(world, out)
    before_inputs = _digest(world)
    before_outputs = {name: _digest(out / name) if (out / name).is_dir() else None for name in case.outputs}
    port = (out / "port").read_text() if (out / "port").is_file() else ""
    args = case.args.replace("{w}", str(world)).replace("{o}", str(out)).replace("{port}", port).split()
    try:
        result = RUNNER.invoke(app, args)
    finally:
        while _SOCKETS:
            _SOCKETS.pop().close()

    assert result.exit_code == case.code, (result.exit_code, result.output, result.stderr, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert re.search(case.message, errors[0]), errors[0]
    assert "Traceback" not in result.stderr + result.output
    assert _digest(world) == before_inputs  # no input changed or lost
    for name, before in before_outputs.items():
        if before is None:
            assert not _complete(out / name), f"{name} was marked complete"
        else:
            assert _digest(out / name) == before, f"the existing output {name} was changed"


def test_read_only_output_folder(world: Path, tmp_path: Path) -> None:
    """A folder the operating system will not let us write into is refused before any work: a folder without
    write permission, or, for the root user whom permissions do not bind, the kernel's /sys."""
    if os.geteuid() == 0:
        folder = Path("/sys")
    else:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
    result = RUNNER.invoke(app, ["convert", str(world / "brain.tif"), str(folder / "x.zarr"), "--voxel-size", "1", "1", "1"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(r"output folder .* cannot be written \(permission denied\)", errors[0])
    assert not (folder / "x.zarr").exists()
