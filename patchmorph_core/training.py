"""Unsupervised end-to-end training of the patch cascade on chains of nested world-space patches.

One training sample is a *chain*: stage 0's patch covers the whole fixed brain (centre near the tissue
centre, random rotation), and each finer patch (half the extent) lies inside the coarser one, centred
near a random tissue point, with a further small random rotation. Stage ``s`` gets the fixed patch and
the moving image sampled at ``x + u_{s-1}(x)``, where ``u_{s-1}`` is the coarser stage's total
displacement interpolated at the finer patch's points; its total is
``u_s(x) = v_s(x) + u_{s-1}(x + v_s(x))``. All sampling goes through
:func:`~patchmorph_core.spatial.sample_torch` from in-memory pyramids (the level matching the stage's
patch spacing), so gradients flow through the whole chain. The loss is the sum over stages of
:func:`~patchmorph_core.losses.stage_loss` on ``(fixed patch, moving at x + u_s(x))``.

This module holds no file formats: pairs come from a :class:`PairSource` (see ``pipeline/training_data.py``).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from patchmorph_core.alignment import fit_affine, translation_matrix
from patchmorph_core.config import LossConfig, TrainConfig, resolve_device
from patchmorph_core.losses import stage_loss
from patchmorph_core.model import (
    PatchMorph,
    model_from_checkpoint,
    place_model,
    read_checkpoint,
    save_checkpoint,
)
from patchmorph_core.sampling import initial_translation, tissue_bounds, tissue_weights
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, patch_grid, random_rotation, sample_torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchLevel:
    """One pyramid level as a tensor: ``volume`` ``(1, 1, Z, Y, X)``, ``world_to_index`` ``(4, 4)``, spacing."""

    volume: torch.Tensor
    world_to_index: torch.Tensor
    spacing: float


@dataclass(frozen=True)
class TrainVolume:
    """An intensity image (0..1) held in memory for training.

    Attributes:
        image: the pyramid (numpy levels), used for statistics.
        levels: the same levels as tensors, finest first.
        tissue_points: ``(N, 3)`` world points of tissue voxels of a coarse level (patch centres).
        tissue_extent: largest world extent of the tissue box.
    """

    image: MultiscaleImage
    levels: tuple[TorchLevel, ...]
    tissue_points: np.ndarray
    tissue_extent: float

    @classmethod
    def from_image(cls, image: MultiscaleImage, device: torch.device | str = "cpu") -> TrainVolume:
        """Wrap a pyramid whose intensities are already normalised to 0..1."""
        levels = tuple(
            TorchLevel(
                torch.as_tensor(np.asarray(lv.array, dtype=np.float32), device=device)[None, None],
                torch.as_tensor(lv.grid.inverse_affine, dtype=torch.float32, device=device),
                float(lv.grid.spacing.max()),
            )
            for lv in image.levels
        )
        weights, grid = tissue_weights(image)
        points = grid.index_to_world(np.argwhere(weights > 0))
        if points.size == 0:
            points = grid.center[None]
        low, high = tissue_bounds(image)
        return cls(image, levels, points, float(np.max(high - low)))

    def level_for_spacing(self, spacing: float) -> TorchLevel:
        """Coarsest level whose voxel size is at most ``spacing`` (the finest if none is)."""
        chosen = self.levels[0]
        for level in self.levels:
            if level.spacing <= spacing * 1.01:
                chosen = level
        return chosen

    def sample(self, world: torch.Tensor, spacing: float) -> torch.Tensor:
        """Sample at ``(B, P, P, P, 3)`` world points → ``(B, 1, P, P, P)`` (differentiable in ``world``)."""
        level = self.level_for_spacing(spacing)
        volume = level.volume.expand(world.shape[0], -1, -1, -1, -1)
        return sample_torch(volume, level.world_to_index, world)


@dataclass(frozen=True)
class TrainPair:
    """A fixed and a moving volume in one unit; ``initial`` ``(4, 4)`` is the initial world→world alignment
    (fixed → moving): the centre-of-mass translation or the fitted affine (:mod:`patchmorph_core.alignment`),
    the same start that inference uses. ``same_contrast``: the two images were made with one intensity table
    (False: independent contrasts, :meth:`~patchmorph_core.config.LossConfig.for_pair`)."""

    fixed: TrainVolume
    moving: TrainVolume
    initial: np.ndarray
    same_contrast: bool = True

    @classmethod
    def from_images(
        cls,
        fixed: MultiscaleImage,
        moving: MultiscaleImage,
        device: torch.device | str = "cpu",
        alignment: str = "center_of_mass",
        same_contrast: bool = True,
    ) -> TrainPair:
        """Pair two normalised pyramids (moving converted to the fixed unit); ``alignment`` as in
        ``InferenceConfig.initial_alignment``."""
        moving = moving.with_unit(fixed.unit)
        if alignment == "affine":
            initial = fit_affine(fixed, moving).matrix
        else:
            initial = translation_matrix(initial_translation(fixed, moving))
        return cls(
            TrainVolume.from_image(fixed, device), TrainVolume.from_image(moving, device), initial, same_contrast
        )


PairSource = Callable[[np.random.Generator], TrainPair]
"""Returns the training pair for the next step (it may reuse a pair for several steps)."""


def sample_chain(
    rng: np.random.Generator,
    volume: TrainVolume,
    patch_size: int,
    extents: list[float],
    max_rotation_deg: float,
) -> list[Grid]:
    """A chain of nested patch grids, coarse to fine, over the tissue of ``volume`` (see module doc).

    Stage 0 is centred at the tissue centre jittered by up to 5% of ``E_0``; stage ``s > 0`` is centred
    at a random tissue point clipped (in the parent's axes) to within ``E_{s-1} / 4`` of the parent
    centre, so the finer patch lies inside the coarser one (up to its extra rotation of at most
    ``max_rotation_deg / 2``).
    """
    unit = volume.image.unit
    low, high = volume.tissue_points.min(axis=0), volume.tissue_points.max(axis=0)
    centre = (low + high) / 2.0 + rng.uniform(-0.05, 0.05, size=3) * extents[0]
    rotation = random_rotation(rng, max_rotation_deg)
    chain = [patch_grid(centre, extents[0], patch_size, rotation, unit=unit)]
    for extent, parent_extent in zip(extents[1:], extents[:-1], strict=True):
        target = volume.tissue_points[rng.integers(len(volume.tissue_points))]
        offset = rotation.T @ (target - centre)
        offset = np.clip(offset, -parent_extent / 4.0, parent_extent / 4.0)
        centre = centre + rotation @ offset
        rotation = rotation @ random_rotation(rng, max_rotation_deg / 2.0)
        chain.append(patch_grid(centre, extent, patch_size, rotation, unit=unit))
    return chain


@dataclass
class ChainBatch:
    """Per-stage tensors of a batch of chains: ``points[s]`` ``(B, P, P, P, 3)``, ``linear[s]`` ``(B, 3, 3)``,
    ``world_to_index[s]`` ``(B, 4, 4)`` and the stage spacings."""

    points: list[torch.Tensor]
    linear: list[torch.Tensor]
    world_to_index: list[torch.Tensor]
    spacing: list[float]

    @classmethod
    def from_chains(cls, chains: list[list[Grid]], device: torch.device | str = "cpu") -> ChainBatch:
        """Stack ``B`` chains of equal length."""

        def stack(values: list[np.ndarray]) -> torch.Tensor:
            return torch.as_tensor(np.stack(values), dtype=torch.float32, device=device)

        n_stages = len(chains[0])
        return cls(
            points=[stack([c[s].points() for c in chains]) for s in range(n_stages)],
            linear=[stack([c[s].linear for c in chains]) for s in range(n_stages)],
            world_to_index=[stack([c[s].inverse_affine for c in chains]) for s in range(n_stages)],
            spacing=[float(chains[0][s].spacing.max()) for s in range(n_stages)],
        )


def _channels_last(disp: torch.Tensor) -> torch.Tensor:
    """``(B, 3, P, P, P)`` → ``(B, P, P, P, 3)``."""
    return disp.permute(0, 2, 3, 4, 1)


def compose_with_prior(
    update: torch.Tensor,
    points: torch.Tensor,
    prior: torch.Tensor,
    prior_world_to_index: torch.Tensor,
) -> torch.Tensor:
    """Total displacement ``u(x) = v(x) + u_prev(x + v(x))`` on a patch.

    Args:
        update: ``(B, 3, P, P, P)`` world update ``v`` at the patch points.
        points: ``(B, P, P, P, 3)`` world points of the patch.
        prior: ``(B, 3, P', P', P')`` previous total displacement on the coarser patch grid.
        prior_world_to_index: ``(B, 4, 4)`` world→index of the coarser patch grid.

    Returns:
        ``(B, 3, P, P, P)``; the prior is extended by its border value outside its patch.
    """
    where = points + _channels_last(update)
    return update + sample_torch(prior, prior_world_to_index, where, padding_mode="border")


@dataclass
class ChainResult:
    """Output of :func:`run_chains`: the summed loss, per-stage losses and the last stage's total field."""

    loss: torch.Tensor
    stage_losses: list[float]
    parts: dict[str, float]
    displacement: torch.Tensor
    fixed: torch.Tensor = field(repr=False)
    warped: torch.Tensor = field(repr=False)


def run_chains(
    model: PatchMorph, pair: TrainPair, batch: ChainBatch, loss_config: LossConfig
) -> ChainResult:
    """Run the cascade over a batch of chains end to end and sum the stage losses (see module doc)."""
    loss_config = loss_config.for_pair(pair.same_contrast)
    device = batch.points[0].device
    initial = torch.as_tensor(pair.initial, dtype=torch.float32, device=device)
    eye = torch.eye(3, dtype=torch.float32, device=device)

    def initial_disp(world: torch.Tensor) -> torch.Tensor:  # (..., 3) world points -> (..., 3) displacement
        return world @ (initial[:3, :3] - eye).T + initial[:3, 3]

    total = torch.zeros((), device=device)
    stage_losses: list[float] = []
    parts: dict[str, float] = {"sim": 0.0, "smooth": 0.0, "fold": 0.0}
    prior: torch.Tensor | None = None
    for s, (points, linear, spacing) in enumerate(zip(batch.points, batch.linear, batch.spacing, strict=True)):
        fixed = pair.fixed.sample(points, spacing)
        if prior is None:
            prior_here = initial_disp(points)
        else:
            prior_here = _channels_last(sample_torch(prior, batch.world_to_index[s - 1], points, padding_mode="border"))
        moving = pair.moving.sample(points + prior_here, spacing)
        update = model.stage_update(s, fixed, moving, linear)
        if prior is None:
            disp = update + initial_disp(points + _channels_last(update)).permute(0, 4, 1, 2, 3)
        else:
            disp = compose_with_prior(update, points, prior, batch.world_to_index[s - 1])
        warped = pair.moving.sample(points + _channels_last(disp), spacing)
        loss, stage_parts = stage_loss(fixed, warped, disp, linear, loss_config)
        weights = loss_config.stage_weights
        total = total + weights[min(s, len(weights) - 1)] * loss
        stage_losses.append(float(loss.detach()))
        for key, value in stage_parts.items():
            parts[key] += value
        prior = disp
    return ChainResult(total, stage_losses, parts, disp, fixed, warped)


def sample_batch(
    rng: np.random.Generator, model: PatchMorph, pair: TrainPair, batch_size: int, max_rotation_deg: float
) -> ChainBatch:
    """``batch_size`` random chains over the fixed tissue of ``pair`` for ``model``'s stages."""
    extents = model.stage_extents(pair.fixed.tissue_extent)
    chains = [
        sample_chain(rng, pair.fixed, model.config.patch_size, extents, max_rotation_deg) for _ in range(batch_size)
    ]
    return ChainBatch.from_chains(chains, device=pair.fixed.levels[0].volume.device)


def centred_chain(volume: TrainVolume, patch_size: int, extents: list[float]) -> list[Grid]:
    """The deterministic chain used for evaluation: every stage centred on the tissue box, unrotated."""
    low, high = volume.tissue_points.min(axis=0), volume.tissue_points.max(axis=0)
    centre = (low + high) / 2.0
    return [patch_grid(centre, extent, patch_size, unit=volume.image.unit) for extent in extents]


@torch.no_grad()
def chain_displacement(
    model: PatchMorph, pair: TrainPair, chain: list[Grid], loss_config: LossConfig | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Run one chain without gradients (model in eval mode).

    Returns:
        ``(points, displacement, loss)``: the last patch's world points and total displacement, each
        ``(P, P, P, 3)`` float32, and the chain's summed loss.
    """
    was_training = model.training
    model.eval()
    batch = ChainBatch.from_chains([chain], device=pair.fixed.levels[0].volume.device)
    result = run_chains(model, pair, batch, loss_config or LossConfig())
    model.train(was_training)
    points = batch.points[-1][0].cpu().numpy()
    disp = _channels_last(result.displacement)[0].cpu().numpy()
    return points, disp, float(result.loss)


@dataclass
class TrainResult:
    """What a training run did: steps, final (smoothed) loss, wall time and where it wrote."""

    steps: int
    final_loss: float
    seconds: float
    checkpoint: Path
    loss_csv: Path


def loss_csv_path(checkpoint: str | Path) -> Path:
    """The loss curve beside a checkpoint: ``<checkpoint>.loss.csv``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".loss.csv")


def _rng_state(rng: np.random.Generator) -> dict:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}


def _restore_rng(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])


def _open_loss_csv(path: Path, start_step: int, n_stages: int) -> None:
    """Create the loss CSV, or keep only the rows up to ``start_step`` of an existing one (resume)."""
    header = ["step", "loss", "sim", "smooth", "fold", *[f"stage{s}" for s in range(n_stages)], "seconds"]
    rows: list[list[str]] = []
    if start_step > 0 and path.is_file():
        with path.open() as fh:
            rows = [r for r in csv.reader(fh)][1:]
        rows = [r for r in rows if r and int(r[0]) <= start_step]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Adam learning rate of optimizer step ``step`` (0-based) under ``config.lr_schedule``."""
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))


def train(config: TrainConfig, source: PairSource, progress: bool = True, label: str | None = None) -> TrainResult:
    """Train (or resume training) a :class:`PatchMorph` model.

    Args:
        config: the resolved training config (its ``model`` is used unless resuming).
        source: gives the training pair of each step from the run's random generator.
        progress: show a tqdm progress bar.
        label: what the progress bar says (None: ``train``, with the step numbers of a resumed run, e.g.
            ``train (steps 101-200)``); a caller that continues a model's steps for its own purpose (a fine-tuning
            from weights that count their training's steps) names that purpose.

    Returns:
        A :class:`TrainResult`; the checkpoint holds the model, the resolved configs, the optimizer,
        the step and the RNG states, and a loss CSV lies beside it.
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, source, progress, label)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, source: PairSource, progress: bool, label: str | None) -> TrainResult:
    """:func:`train` with the thread count already set."""
    device = torch.device(resolve_device(config.device))
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    checkpoint = Path(config.checkpoint)
    model = PatchMorph(config.model)
    if config.init_weights is not None:
        model = model_from_checkpoint(read_checkpoint(config.init_weights), config.init_weights)
        log.info("fine-tuning from %s (its model config replaces the config's)", config.init_weights)
    start_step = 0
    payload = read_checkpoint(checkpoint) if config.resume and checkpoint.is_file() else None
    if config.resume and payload is None:
        log.warning("resume: no checkpoint %s yet (none was saved, or another path): training starts at step 0", checkpoint)
    if payload is not None:
        model = model_from_checkpoint(payload, checkpoint)
    place_model(model, device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if payload is not None:
        if payload["optimizer"] is not None:
            optimizer.load_state_dict(payload["optimizer"])
        start_step = int(payload["step"])
        if "rng" in payload["extra"]:
            _restore_rng(rng, payload["extra"]["rng"])
        if "source" in payload["extra"] and hasattr(source, "restore"):
            source.restore(payload["extra"]["source"])  # the pair in use at the checkpoint, as one run goes on
        log.info("resuming %s at step %d", checkpoint, start_step)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    csv_path = loss_csv_path(checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    _open_loss_csv(csv_path, start_step, model.config.n_stages)
    configs = {"train": config.model_dump(mode="json")}
    started = time.time()
    smoothed = math.nan if payload is None else float(payload["extra"].get("loss", math.nan))  # the run's, resumed

    def save(step: int) -> None:
        extra = {"rng": _rng_state(rng), "loss": smoothed, "seconds": time.time() - started}
        if hasattr(source, "state"):  # a source that keeps a pair for several steps (pipeline.training_data.SynthPairs)
            extra["source"] = source.state()
        save_checkpoint(checkpoint, model, step=step, optimizer=optimizer, configs=configs, extra=extra)

    desc = label or (f"train (steps {start_step + 1}-{config.steps})" if start_step else "train")
    bar = tqdm(total=config.steps - start_step, desc=desc, disable=not progress, unit="step")
    with csv_path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        for step in range(start_step, config.steps):
            pair = source(rng)
            batch = sample_batch(rng, model, pair, config.batch_size, config.max_patch_rotation_deg)
            with torch.autocast(device.type, enabled=use_amp):
                result = run_chains(model, pair, batch, config.loss)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(result.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            value = float(result.loss.detach())
            smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
            writer.writerow(
                [step + 1, f"{value:.6f}", *(f"{result.parts[k]:.6f}" for k in ("sim", "smooth", "fold")),
                 *(f"{v:.6f}" for v in result.stage_losses), f"{time.time() - started:.1f}"]
            )
            fh.flush()
            bar.set_postfix(loss=f"{smoothed:.4f}")
            bar.update()
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                save(step + 1)
    bar.close()
    seconds = time.time() - started
    log.info("trained to step %d in %.0f s, loss %.4f; wrote %s and %s", config.steps, seconds, smoothed, checkpoint, csv_path)
    return TrainResult(config.steps, smoothed, seconds, checkpoint, csv_path)
