"""Networks, the model's unit conversion on rotated anisotropic patches, checkpoints and configs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from patchmorph_core.config import ModelConfig, TrainConfig, load_yaml
from patchmorph_core.errors import InputError
from patchmorph_core.model import (
    DEFAULT_WEIGHTS,
    PatchMorph,
    blend_checkpoints,
    load_model,
    read_checkpoint,
    release_checkpoint,
    save_checkpoint,
    stage_extents,
)
from patchmorph_core.networks import NETWORKS, AffineHead, UNet3D, conv_concat
from patchmorph_core.spatial import patch_grid, random_rotation
from patchmorph_core.transforms import affine_displacement

P = 16
CONFIG = ModelConfig(patch_size=P, n_stages=2, widths=(4, 8, 8), affine_widths=(4, 8))


class Constant(torch.nn.Module):
    """A stub network that returns one value per output channel for every input."""

    def __init__(self, value: torch.Tensor, spatial: bool) -> None:
        super().__init__()
        self.value = value
        self.spatial = spatial

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        if self.spatial:
            return self.value.view(1, 3, 1, 1, 1).expand(pair.shape[0], 3, P, P, P)
        return self.value.expand(pair.shape[0], 3, 4)


def _patch_linear() -> torch.Tensor:
    """``(1, 3, 3)`` linear part of a rotated patch with anisotropic spacing (0.5, 2.0, 1.0) mm."""
    grid = patch_grid((0, 0, 0), (0.5 * P, 2.0 * P, 1.0 * P), P, random_rotation(np.random.default_rng(4), 80.0))
    return torch.as_tensor(np.array(grid.linear), dtype=torch.float32)[None]


def test_network_shapes_and_identity_start() -> None:
    pair = torch.rand(2, 2, P, P, P)
    assert isinstance(NETWORKS["unet"]((4, 8, 8)), UNet3D)
    out = UNet3D((4, 8, 8))(pair)
    assert out.shape == (2, 3, P, P, P) and out.abs().max() < 1e-2
    theta = AffineHead((4, 8), P)(pair)
    assert theta.shape == (2, 3, 4) and torch.all(theta == 0)


def test_skip_connection_equals_the_concatenation() -> None:
    """The concatenation-free skip connection gives the values of ``layer(cat)``, in both memory formats,
    and its gradients (training uses the same forward)."""
    torch.manual_seed(3)
    layer = nn.Sequential(nn.Conv3d(5 + 3, 4, 3, padding=1), nn.LeakyReLU(0.2))
    first = torch.randn(2, 5, 6, 8, 7, requires_grad=True)
    second = torch.randn(2, 3, 6, 8, 7, requires_grad=True)
    reference = layer(torch.cat([first, second], dim=1))
    (grad_first, grad_second) = torch.autograd.grad(reference.square().sum(), (first, second))
    out = conv_concat(layer, first, second)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.autograd.grad(out.square().sum(), (first, second)), (grad_first, grad_second), rtol=1e-4, atol=1e-4
    )
    layer.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(conv_concat(layer, first, second), reference, rtol=1e-5, atol=1e-5)


def test_stage_update_converts_patch_voxels_to_world() -> None:
    model = PatchMorph(CONFIG)
    linear = _patch_linear()
    d_vox = torch.tensor([1.0, -2.0, 0.5])
    model.dense = Constant(d_vox, spatial=True)
    fixed = torch.rand(1, 1, P, P, P)
    update = model.stage_update(1, fixed, fixed, linear)  # a dense-only stage
    assert update.shape == (1, 3, P, P, P)
    expected = linear[0] @ d_vox
    torch.testing.assert_close(update[0, :, 3, 5, 7], expected)
    # the affine stage: a known affine head output plus the same dense part, composed exactly
    theta = torch.zeros(1, 3, 4)
    theta[0, :, 3] = torch.tensor([0.5, 0.0, -1.0])
    theta[0, 1, 1] = 0.1
    model.affine = Constant(theta, spatial=False)
    update = model.stage_update(0, fixed, fixed, linear)
    a = affine_displacement(theta, (P, P, P))[0, :, 3, 5, 7]
    total_vox = a + (torch.eye(3) + theta[0, :, :3]) @ d_vox
    torch.testing.assert_close(update[0, :, 3, 5, 7], linear[0] @ total_vox)


def test_stage_update_rejects_mismatched_patches() -> None:
    model = PatchMorph(CONFIG)
    with pytest.raises(InputError, match="stage_update"):
        model.stage_update(0, torch.rand(1, 1, P, P, P), torch.rand(1, 1, 8, 8, 8), _patch_linear())


def test_stage_extents_halve() -> None:
    assert stage_extents(100.0, 3, margin=1.2) == pytest.approx([120.0, 60.0, 30.0])
    assert PatchMorph(CONFIG).stage_extents(10.0) == pytest.approx([12.0, 6.0])
    with pytest.raises(InputError, match="extent"):
        stage_extents(0.0, 2)


def test_checkpoint_round_trip_and_bad_files(tmp_path: Path) -> None:
    model = PatchMorph(CONFIG)
    with torch.no_grad():
        model.dense.head.bias.fill_(0.25)
    path = save_checkpoint(tmp_path / "m.pt", model, step=7, configs={"train": {"steps": 7}})
    loaded = load_model(path)
    assert loaded.config == CONFIG and not loaded.training
    pair = torch.rand(1, 1, P, P, P)
    torch.testing.assert_close(loaded.stage_update(0, pair, pair, _patch_linear()), model.stage_update(0, pair, pair, _patch_linear()))
    with pytest.raises(InputError, match="do not exist"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="corrupt"):
        load_model(tmp_path / "bad.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a PatchMorph checkpoint"):
        load_model(tmp_path / "other.pt")


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on the marker: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (self.marker,))  # type: ignore[return-value]


def test_crafted_checkpoint_is_refused_without_running_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    model = PatchMorph(CONFIG)
    path = save_checkpoint(tmp_path / "m.pt", model)
    payload = torch.load(path, weights_only=True)
    payload["extra"] = {"hook": _RunsCode(marker)}
    torch.save(payload, tmp_path / "crafted.pt")
    with pytest.raises(InputError, match="besides tensors and plain data"):
        load_model(tmp_path / "crafted.pt")
    assert not marker.exists()
    torch.load(tmp_path / "crafted.pt", weights_only=False)  # the file really runs code when unpickled
    assert marker.exists()


class _CallsOs:
    """Unpickling this calls ``os.mkdir`` (module ``posix``, which torch blocks outright and words otherwise)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_checkpoint_calling_os_is_named_as_such_and_never_advised_to_load_unsafely(tmp_path: Path) -> None:
    # torch's message for a blocked module (os.system, os.mkdir, ...) says "unsupported GLOBAL" and opens with
    # advice to load with weights_only=False: the user must hear what the file holds, not "corrupt", nor that
    marker = tmp_path / "code-ran"
    payload = torch.load(save_checkpoint(tmp_path / "m.pt", PatchMorph(CONFIG)), weights_only=True)
    payload["extra"] = {"hook": _CallsOs(marker)}
    torch.save(payload, tmp_path / "crafted.pt")
    with pytest.raises(InputError, match="besides tensors and plain data") as caught:
        load_model(tmp_path / "crafted.pt")
    assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


def test_damaged_and_mismatched_checkpoints_give_one_line(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", PatchMorph(CONFIG))
    data = path.read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])  # a copy cut short
    (tmp_path / "empty.pt").write_bytes(b"")
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["widths"] = [2 * w for w in payload["model_config"]["widths"]]  # another width
    torch.save(payload, tmp_path / "wider.pt")
    for name, message in (("half", "corrupt"), ("empty", "corrupt"), ("wider", r"do not match .*size mismatch")):
        with pytest.raises(InputError, match=message) as caught:
            load_model(tmp_path / f"{name}.pt")
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 400, str(caught.value)


def test_config_validation_and_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(patch_size=20, widths=(8, 16, 16, 16))
    good = tmp_path / "train.yaml"
    good.write_text("steps: 5\nmodel:\n  patch_size: 16\n  widths: [4, 8]\n")
    config = load_yaml(good, TrainConfig)
    assert config.steps == 5 and config.model.widths == (4, 8)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  patch_sise: 16\nsteps: many\n")  # every problem at once, and the keys of its section
    with pytest.raises(InputError, match=r"bad.yaml: 2 keys invalid: 'model.patch_sise' .*'steps' .*under 'model': patch_size"):
        load_yaml(bad, TrainConfig)
    with pytest.raises(InputError, match="does not exist"):
        load_yaml(tmp_path / "none.yaml", TrainConfig)
    with pytest.raises(InputError, match="unknown"):
        PatchMorph(ModelConfig(network="transformer"))


def test_release_checkpoint_and_default_weights(tmp_path: Path) -> None:
    model = PatchMorph(CONFIG)
    optimizer = torch.optim.Adam(model.parameters())
    source = save_checkpoint(tmp_path / "train.pt", model, step=3, optimizer=optimizer, extra={"rng": {}})
    released = release_checkpoint(source, tmp_path / "release.pt")
    payload = read_checkpoint(released)
    assert payload["optimizer"] is None and "rng" not in payload["extra"] and payload["step"] == 3
    dense_only = load_model(release_checkpoint(source, tmp_path / "dense.pt", affine_stages=0))
    assert dense_only.affine is None and dense_only.config.affine_stages == 0
    default = load_model()  # the committed default model
    assert DEFAULT_WEIGHTS.stat().st_size < 20 * 2**20
    pair = torch.rand(1, 1, default.config.patch_size, *(default.config.patch_size,) * 2)
    assert default.stage_update(0, pair, pair, torch.eye(3)[None]).shape == (1, 3, *pair.shape[2:])


def test_blend_checkpoints_interpolates_the_weights(tmp_path: Path) -> None:
    """The blend is (1 - alpha) base + alpha tuned, parameter by parameter; other architectures are refused."""
    torch.manual_seed(0)
    base = save_checkpoint(tmp_path / "base.pt", PatchMorph(CONFIG), step=5)
    tuned_model = PatchMorph(CONFIG)
    tuned = save_checkpoint(tmp_path / "tuned.pt", tuned_model, step=7, extra={"rng": {}, "loss": 0.5})
    blend = read_checkpoint(blend_checkpoints(base, tuned, 0.25, tmp_path / "blend.pt"))
    first, second = read_checkpoint(base)["state_dict"], read_checkpoint(tuned)["state_dict"]
    key = next(k for k, v in first.items() if v.is_floating_point() and not torch.equal(v, second[k]))
    torch.testing.assert_close(blend["state_dict"][key], 0.75 * first[key] + 0.25 * second[key])
    assert blend["optimizer"] is None and "rng" not in blend["extra"] and blend["extra"]["blended_from"]["alpha"] == 0.25
    load_model(tmp_path / "blend.pt")  # a loadable model
    other = save_checkpoint(tmp_path / "other.pt", PatchMorph(ModelConfig(patch_size=P, n_stages=2, widths=(4, 8))), step=1)
    with pytest.raises(InputError, match="different architectures"):
        blend_checkpoints(base, other, 0.5, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="outside"):
        blend_checkpoints(base, tuned, 1.5, tmp_path / "bad.pt")
