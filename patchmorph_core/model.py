"""The PatchMorph cascade model: networks in patch-voxel units, updates in world units, checkpoints.

Choices (the paper is silent on them):

* **One dense network for all stages** and one affine head for the first ``affine_stages`` stages. The
  networks see only the two patches; the patch's index→world linear part ``L`` (rotation × spacing)
  turns their patch-voxel outputs into world displacements, so the same weights serve every scale
  (human millimetres, mouse micrometres) and any number of stages at inference.
* **Affine then dense at affine stages.** The affine ``a`` is predicted first; the moving patch is
  warped by it inside the patch; the dense net predicts ``d`` on the result; the update is the exact
  composition ``a(q) + (I + A) d(q)`` (:func:`patchmorph_core.transforms.compose_affine_dense`).
* **Composition across stages** (training and inference): the moving patch of stage ``s`` is sampled
  at ``x + u_{s-1}(x)``; with the update ``v`` the new total is ``u_s(x) = v(x) + u_{s-1}(x + v(x))``
  (:func:`patchmorph_core.training.compose_with_prior`); ``u_{s-1}(x) + v(x)`` is its first-order form.
* **Stage extents**: ``E_0`` = largest world extent of the fixed tissue box × ``extent_margin``,
  ``E_{s+1} = E_s / 2``; patch spacing ``h_s = E_s / P``.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from patchmorph_core.config import ModelConfig
from patchmorph_core.errors import InputError
from patchmorph_core.networks import NETWORKS, AffineHead
from patchmorph_core.transforms import (
    affine_displacement,
    compose_affine_dense,
    integrate_velocity,
    voxel_to_world,
    warp_patch,
)

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS: Path = Path(__file__).resolve().parent / "weights" / "patchmorph_default.pt"
"""The committed default model (see ``weights/WEIGHTS.md`` for how it was trained)."""

CHECKPOINT_FORMAT = "patchmorph-checkpoint/1"


def stage_extents(fixed_bounds_extent: float, n_stages: int, margin: float = 1.2) -> list[float]:
    """World extent ``E_s`` of the patches of each stage.

    Args:
        fixed_bounds_extent: largest world extent of the fixed image's tissue box (its unit).
        n_stages: number of stages.
        margin: ``E_0 = fixed_bounds_extent * margin`` so the coarsest patch holds the whole brain
            with room for misalignment.

    Returns:
        ``[E_0, E_0 / 2, ..., E_0 / 2**(n_stages - 1)]``.
    """
    if not fixed_bounds_extent > 0:
        raise InputError(
            f"fixed tissue extent {fixed_bounds_extent} is not positive: the fixed image looks empty; "
            "check its intensities and voxel size."
        )
    return [float(fixed_bounds_extent) * margin / 2.0**s for s in range(n_stages)]


class PatchMorph(nn.Module):
    """Cascade of patch registration stages sharing one dense network (and one affine head).

    Args:
        config: the model configuration.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.network not in NETWORKS:
            raise InputError(
                f"model network {config.network!r} is unknown: use one of {', '.join(sorted(NETWORKS))}."
            )
        self.config = config
        self.dense = NETWORKS[config.network](config.widths)
        self.affine = AffineHead(config.affine_widths, config.patch_size) if config.affine_stages > 0 else None

    def stage_extents(self, fixed_bounds_extent: float, n_stages: int | None = None) -> list[float]:
        """:func:`stage_extents` with this model's margin and (by default) stage count."""
        count = self.config.n_stages if n_stages is None else n_stages
        return stage_extents(fixed_bounds_extent, count, self.config.extent_margin)

    def stage_update_vox(self, stage: int, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Displacement update in patch-voxel units: ``(B, 1, P, P, P)`` × 2 → ``(B, 3, P, P, P)``."""
        if self.affine is not None and stage < self.config.affine_stages:
            theta = self.affine(torch.cat([fixed, moving], dim=1))
            moving = warp_patch(moving, affine_displacement(theta, tuple(moving.shape[-3:])))
            dense = self._dense(fixed, moving)
            return compose_affine_dense(theta, dense)
        return self._dense(fixed, moving)

    def _dense(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        velocity = self.dense(torch.cat([fixed, moving], dim=1))
        return integrate_velocity(velocity, self.config.integrate_steps)

    def stage_update(
        self, stage: int, fixed: torch.Tensor, moving: torch.Tensor, patch_linear: torch.Tensor
    ) -> torch.Tensor:
        """World-space displacement update at the patch's voxel centres.

        Args:
            stage: cascade stage (0 = coarsest); stages ``< affine_stages`` include the affine part.
                Stages beyond ``n_stages`` reuse the shared dense network.
            fixed: ``(B, 1, P, P, P)`` fixed patch, intensities normalised to 0..1.
            moving: ``(B, 1, P, P, P)`` moving patch sampled through the current transform, 0..1.
            patch_linear: ``(B, 3, 3)`` the patch grid's index→world linear part (rotation × spacing).

        Returns:
            ``(B, 3, P, P, P)`` update ``v``: the moving patch is matched by ``moving(q + L^{-1} v)``;
            components ``(z, y, x)`` of the world frame, in world units (the patch's unit).
        """
        if fixed.shape != moving.shape or fixed.dim() != 5 or fixed.shape[1] != 1:
            raise InputError(
                f"stage_update needs fixed and moving patches of one shape (B, 1, P, P, P); got "
                f"{tuple(fixed.shape)} and {tuple(moving.shape)}."
            )
        return voxel_to_world(self.stage_update_vox(stage, fixed, moving), patch_linear)


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device``; on CPU also store its weights channels-last (``torch.channels_last_3d``).

    oneDNN's 3D convolutions are faster on channels-last tensors and give the same values to float32
    rounding (``docs/method.md``, *Networks*). Returns the same module.
    """
    model.to(device)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last_3d)
    return model


def save_checkpoint(
    path: str | Path,
    model: PatchMorph,
    *,
    step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    configs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename).

    Args:
        path: output ``.pt`` file.
        model: the model; its resolved :class:`ModelConfig` is stored with the weights.
        step: optimizer steps done.
        optimizer: its state is stored for resuming (omit for a release file).
        configs: further resolved configs as plain dicts (e.g. ``{"train": ..., "loss": ...}``).
        extra: anything else (RNG states, wall time, final loss).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": model.config.model_dump(mode="json"),
        "configs": configs or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's payload on the CPU with ``weights_only=True`` (tensors and plain data only, so a
    crafted file cannot run code); InputError when it is missing, holds other objects or is not a
    PatchMorph checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model weights {path} do not exist: give the path of a PatchMorph checkpoint (.pt).")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch words a refused object two ways: "Unsupported global: GLOBAL pathlib.Path.touch" and, for
        # modules it blocks outright (os, subprocess, ...), "unsupported GLOBAL posix.system whose module ..."
        if "unsupported global" in str(err).lower():
            raise InputError(
                f"model weights {path} hold Python objects besides tensors and plain data, which are never "
                "loaded (they could run code): use a checkpoint written by `patchmorph train`."
            ) from err
        raise InputError(f"model weights {path} cannot be read ({_first_line(err)}): the file is corrupt; retrain or re-copy it.") from err
    except Exception as err:  # torch raises many kinds for a damaged file
        raise InputError(f"model weights {path} cannot be read ({_first_line(err)}): the file is corrupt; retrain or re-copy it.") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"model weights {path} are not a PatchMorph checkpoint: give a file written by `patchmorph train`.")
    return payload


def _first_line(err: BaseException) -> str:
    """The first sentence of the first telling line of an exception's message, at most 200 characters: torch's messages run to
    pages, open with a heading ("Error(s) in loading state_dict for PatchMorph:") or with advice to load with
    ``weights_only=False`` (which would run a crafted file's code), all skipped; the type's name when nothing
    is left (an empty file)."""
    for line in str(err).splitlines():
        line = line.strip()
        if line and not line.endswith(":") and "weights_only" not in line and not line.startswith("Check the documentation"):
            return line.split(". ")[0][:200]
    return type(err).__name__


def model_from_checkpoint(payload: dict[str, Any], path: str | Path = "<checkpoint>") -> PatchMorph:
    """Build a :class:`PatchMorph` from a checkpoint payload (see :func:`read_checkpoint`)."""
    try:
        config = ModelConfig.model_validate(payload["model_config"])
        model = PatchMorph(config)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, ValidationError, RuntimeError) as err:
        raise InputError(
            f"model weights {path} do not match this PatchMorph version ({_first_line(err)}): retrain the model."
        ) from err
    return model


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> PatchMorph:
    """Load a trained model in eval mode on ``device`` (``path=None``: :data:`DEFAULT_WEIGHTS`)."""
    path = DEFAULT_WEIGHTS if path is None else Path(path)
    model = model_from_checkpoint(read_checkpoint(path), path)
    log.info("loaded PatchMorph weights %s", path)
    return model.to(device).eval()


def release_checkpoint(
    source: str | Path, target: str | Path, *, affine_stages: int | None = None
) -> Path:
    """Write a release copy of a training checkpoint: weights and configs, no optimizer state.

    Args:
        source: a checkpoint written by ``patchmorph train``.
        target: the release file (e.g. :data:`DEFAULT_WEIGHTS`).
        affine_stages: override the number of affine stages; ``0`` drops the affine head, so every
            stage is dense only (the default model does this, see ``weights/WEIGHTS.md``).
    """
    payload = read_checkpoint(source)
    if affine_stages is not None:
        payload["model_config"]["affine_stages"] = affine_stages
        if affine_stages == 0:
            payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("affine.")}
    model = model_from_checkpoint(payload, source)
    extra = {k: v for k, v in payload["extra"].items() if k != "rng"}
    extra["released_from"] = {"path": str(source), "step": int(payload["step"]), "affine_stages": affine_stages}
    return save_checkpoint(target, model, step=int(payload["step"]), configs=payload["configs"], extra=extra)


def blend_checkpoints(base: str | Path, tuned: str | Path, alpha: float, target: str | Path) -> Path:
    """Write a release file whose weights are ``(1 − alpha) · base + alpha · tuned``, element by element.

    For a model ``tuned`` fine-tuned from ``base`` (the same architecture): the interpolation keeps most of
    what the fine-tuning added while giving back little of what the base did well (WiSE-FT, Wortsman et
    al., CVPR 2022; the default model's step 6, ``weights/WEIGHTS.md``).

    Args:
        base, tuned: checkpoints of one :class:`ModelConfig` (``tuned``'s configs are kept).
        alpha: weight of ``tuned`` in ``[0, 1]``.
        target: the release file (no optimizer state).

    Raises:
        InputError: the two checkpoints hold different architectures, or ``alpha`` is outside ``[0, 1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"blend weight alpha {alpha} is outside [0, 1]: give the fine-tuned model's share.")
    first, second = read_checkpoint(base), read_checkpoint(tuned)
    if first["model_config"] != second["model_config"] or first["state_dict"].keys() != second["state_dict"].keys():
        raise InputError(f"model weights {base} and {tuned} hold different architectures: blend only a model and its fine-tune.")
    state = {
        key: torch.lerp(value, second["state_dict"][key], alpha) if value.is_floating_point() else second["state_dict"][key]
        for key, value in first["state_dict"].items()
    }
    model = model_from_checkpoint({**second, "state_dict": state}, tuned)
    extra = {k: v for k, v in second["extra"].items() if k != "rng"}
    extra["blended_from"] = {"base": str(base), "tuned": str(tuned), "alpha": float(alpha), "tuned_step": int(second["step"])}
    return save_checkpoint(target, model, step=int(second["step"]), configs=second["configs"], extra=extra)
