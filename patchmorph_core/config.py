"""Typed configuration of the model, its losses, training and inference (pydantic v2, ``extra="forbid"``).

Every class maps one-to-one onto a YAML file in ``configs/`` (:func:`load_yaml`). The resolved configs
are stored in every checkpoint (:func:`patchmorph_core.model.save_checkpoint`) and in every output's
metadata, so a result always says what made it.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from patchmorph_core.errors import InputError


class _Strict(BaseModel):
    """Base: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The network cascade.

    Attributes:
        patch_size: ``P``, voxels per patch edge at every stage (the patch spacing is ``E_s / P``).
        n_stages: number of coarse-to-fine stages; stage ``s`` covers ``E_0 / 2**s`` world units.
        affine_stages: the first ``affine_stages`` stages also predict a global affine per patch.
        network: key of :data:`patchmorph_core.networks.NETWORKS` for the dense displacement network.
        widths: channels per U-Net level, finest first (encoder; the decoder mirrors it).
        affine_widths: channels of the affine head's strided encoder, finest first.
        integrate_steps: scaling-and-squaring steps for the dense part (0 = plain displacement).
        extent_margin: ``E_0`` = largest world extent of the fixed tissue box times this margin.
    """

    patch_size: int = Field(32, ge=8, le=256)
    n_stages: int = Field(3, ge=1, le=8)
    affine_stages: int = Field(1, ge=0, le=8)
    network: str = "unet"
    widths: tuple[int, ...] = (8, 16, 16, 16)
    affine_widths: tuple[int, ...] = (8, 16, 32, 32)
    integrate_steps: int = Field(0, ge=0, le=12)
    extent_margin: float = Field(1.2, ge=1.0, le=4.0)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        levels = len(self.widths) - 1
        if not self.widths or any(w < 1 for w in self.widths) or any(w < 1 for w in self.affine_widths):
            raise ValueError("widths and affine_widths must be positive channel counts")
        if self.patch_size % (2**levels) != 0:
            raise ValueError(f"patch_size {self.patch_size} must be divisible by 2**{levels} (U-Net levels)")
        return self


class LossConfig(_Strict):
    """Similarity and regularizer weights of one cascade stage (the same at every stage).

    Attributes:
        similarity: ``"ncc"`` (local normalised cross-correlation, one contrast), ``"mind"`` (MIND-SSC
            descriptors, any contrasts; :mod:`patchmorph_core.similarity`) or ``"mse"``.
        ncc_window: local NCC window in patch voxels.
        mind_radius: MIND patch-distance window half-width, patch voxels.
        mind_dilation: MIND neighbour distance, patch voxels.
        similarity_weight: weight of the similarity term. MIND's loss changes about 5x less per voxel of
            misalignment than local NCC's (1-3 voxel shifts of a synthetic 2 mm brain patch), so ``mind`` takes
            5 to keep the balance with the regularizer that ``ncc`` has at 1.
        smooth_weight: weight of the smoothness term (mean squared world-unit gradient of the
            displacement, dimensionless so it means the same at every scale).
        affine_free_smoothness: subtract the patch-mean gradient first, so a global affine is free.
        fold_weight: weight of the penalty ``relu(fold_eps - det J)`` on the coordinate field.
        fold_eps: Jacobian determinant below which the fold penalty starts.
        stage_weights: weight of each stage's loss in the sum (shorter lists repeat their last value).
        cross_contrast_similarity: the similarity of training pairs whose two images have independently drawn
            contrasts (``DataConfig.independent_contrast``), with its own weight ``cross_contrast_weight``;
            None: ``similarity`` for every pair. With ``similarity: ncc`` and ``mind`` here, each pair is
            trained with the similarity that holds for it: local NCC where one intensity table made both images.
        cross_contrast_weight: weight of ``cross_contrast_similarity``.
    """

    similarity: Literal["ncc", "mind", "mse"] = "ncc"
    ncc_window: int = Field(9, ge=3)
    mind_radius: int = Field(1, ge=0)
    mind_dilation: int = Field(2, ge=1)
    similarity_weight: float = Field(1.0, gt=0.0)
    smooth_weight: float = Field(1.0, ge=0.0)
    affine_free_smoothness: bool = True
    fold_weight: float = Field(10.0, ge=0.0)
    fold_eps: float = Field(0.05, ge=0.0, le=1.0)
    stage_weights: tuple[float, ...] = (1.0,)
    cross_contrast_similarity: Literal["ncc", "mind", "mse"] | None = None
    cross_contrast_weight: float = Field(5.0, gt=0.0)

    def for_pair(self, same_contrast: bool) -> LossConfig:
        """The loss of one training pair: this one, or with the cross-contrast similarity and weight when the
        pair's two images have independent contrasts and :attr:`cross_contrast_similarity` is set."""
        if same_contrast or self.cross_contrast_similarity is None:
            return self
        return self.model_copy(
            update={"similarity": self.cross_contrast_similarity, "similarity_weight": self.cross_contrast_weight}
        )


class LabelSet(_Strict):
    """Label maps that synthetic training pairs are drawn from (``DataConfig.label_sets``).

    Attributes:
        images: label-map paths (NIfTI, NRRD or OME-Zarr), relative to the YAML file's folder.
        spacing: reduce each to the integer factor nearest this isotropic spacing in ``DataConfig.unit``
            (None: as is).
        skull_strip: the maps follow FreeSurfer/SynthSeg ids, so ids of 500 and above (skull, scalp, eyes) are
            painted as background; False for other atlases (e.g. the Allen CCF annotation), whose ids are
            renumbered 1..K on reading.
        weight: relative probability of drawing a pair from this set.
    """

    images: tuple[str, ...]
    spacing: float | None = None
    skull_strip: bool = True
    weight: float = Field(1.0, gt=0.0)


class DataConfig(_Strict):
    """Where training pairs come from (paths are resolved against the YAML file's folder).

    Attributes:
        kind: ``"pairs"`` (``pairs`` lists fixed/moving image paths), ``"atlas"`` (``atlas`` against each
            of ``images``), or ``"synthseg"`` (``images`` are label maps; images are synthesized on the fly).
        images: image or label-map paths (NIfTI, NRRD or OME-Zarr).
        pairs: ``[fixed, moving]`` path pairs for ``kind="pairs"``.
        atlas: the fixed atlas image for ``kind="atlas"``.
        spacing: resample every volume to this isotropic spacing in ``unit`` before training (None: as is).
        unit: unit the volumes are expressed in for training.
        max_rotation_deg: random rotation of the moving image's pose (and of the patch axes).
        max_translation: random translation of the moving pose, in ``unit``.
        max_scaling: random isotropic scaling of the moving pose, ``exp(U(-s, s))``.
        deform_disp_vox: largest random smooth deformation of the moving labels, voxels (synthseg only).
        refresh_every: synthesize a new image pair every this many steps (synthseg only).
        label_sets: (synthseg) further label maps with their own spacing and id convention, e.g. the mouse
            CCF annotation beside the human SynthSeg maps; ``images`` (at ``spacing``, skull-stripped) is the
            first set when given.
        independent_contrast: (synthseg) probability that the two images of a pair get independently drawn
            intensities per structure (SynthMorph-style contrast-robust training) instead of one shared table.
        resolution_jitter: (synthseg) each pair's label maps are resampled (nearest) by a factor
            ``exp(U(-r, r))`` per pair, so the brain spans more or fewer voxels (the method works in world units
            relative to the tissue's extent, so this is what "sizes between mouse and human" changes).
        max_translation_fraction: when given, the moving pose's translation is at most this fraction of the
            moving tissue's largest extent (instead of ``max_translation``), so mouse and human brains are moved alike.
    """

    kind: Literal["pairs", "atlas", "synthseg"] = "synthseg"
    images: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    atlas: str | None = None
    spacing: float | None = 2.0
    unit: str = "millimeter"
    max_rotation_deg: float = Field(20.0, ge=0.0, le=180.0)
    max_translation: float = Field(20.0, ge=0.0)
    max_scaling: float = Field(0.1, ge=0.0, le=1.0)
    deform_disp_vox: float = Field(3.0, ge=0.0)
    refresh_every: int = Field(4, ge=1)
    label_sets: tuple[LabelSet, ...] = ()
    independent_contrast: float = Field(0.0, ge=0.0, le=1.0)
    resolution_jitter: float = Field(0.0, ge=0.0, le=1.0)
    max_translation_fraction: float | None = Field(None, ge=0.0, le=1.0)


class TrainConfig(_Strict):
    """One training run (``patchmorph train --config ...``).

    Attributes:
        data: training pairs.
        model: the cascade to train (ignored on ``resume``: the checkpoint's wins).
        loss: loss weights.
        steps: optimizer steps in total.
        batch_size: patch chains per step.
        lr: Adam learning rate (the peak one with ``lr_schedule: cosine``).
        lr_schedule: ``"constant"``, or ``"cosine"``: ``lr · (1 + cos(π · step / steps)) / 2``, from ``lr`` at
            step 0 down to 0 at ``steps`` (a function of the step alone, so a resumed run follows the same
            curve). Annealing ends a run on averaged weights instead of a snapshot of noisy 2-chain steps.
        seed: seeds numpy and torch; a resumed run continues the saved RNG states.
        device: ``"auto"`` (cuda when available), ``"cpu"`` or ``"cuda"``.
        amp: mixed precision on CUDA (ignored on CPU).
        threads: torch CPU threads (None: torch's default).
        checkpoint: checkpoint path; a loss curve ``<checkpoint>.loss.csv`` is written beside it.
        checkpoint_every: save every this many steps (and at the end).
        resume: continue from ``checkpoint`` when it exists.
        max_patch_rotation_deg: random rotation of each training patch chain.
        init_weights: start from this checkpoint's weights and model config (fine-tuning; fresh
            optimizer, step 0); None trains from scratch.
        initial_alignment: the start of every training pair, as in :class:`InferenceConfig` (train
            the way the model will be used).
    """

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    threads: int | None = Field(None, ge=1)
    checkpoint: str = "checkpoints/patchmorph.pt"
    checkpoint_every: int = Field(100, ge=1)
    resume: bool = False
    max_patch_rotation_deg: float = Field(15.0, ge=0.0, le=180.0)
    init_weights: str | None = None
    initial_alignment: Literal["affine", "center_of_mass"] = "center_of_mass"


class InferenceConfig(_Strict):
    """Stochastic patch inference (``patchmorph register``).

    Attributes:
        weights: checkpoint to load (None: the packaged default model).
        n_stages: stages to run (None: as many as ``field_spacing`` needs; see there). Given without
            ``field_spacing``, the field takes the finest stage's patch spacing (``E_0 / 2^(n-1) / P``, never finer
            than the fixed image's voxel).
        overlap: patch overlap factor; the lattice step is ``extent / overlap`` per axis (patches ∝
            overlap³). Default 1.75: each field voxel lies in about 5.4 patches. A denser lattice gives a
            field and an uncertainty map that depend less on the seed, at the cost of more patches
            (``configs/register_stable.yaml`` is the default at 2.0); the measurements behind the choice
            are in ``docs/method.md`` (*Lattice density*).
        patch_layout: ``"field_grid"`` (default): every patch is a ``P³`` block of its stage's field grid —
            axes along the field grid's axes (ordered and signed nearest the world axes, the networks'
            training frame), centre jittered within its lattice cell and then rounded to the field grid,
            no rotation — so each block of patches reads its images once on the field grid
            and adds its estimates with plain slice additions (:func:`~patchmorph_core.inference.estimate_and_accumulate`).
            ``"rotated"``: free centres and random rotations up to ``max_rotation_deg`` with trilinear
            sampling and accumulation per patch (``docs/method.md`` compares the two). A stage whose field spacing differs from its patch
            spacing (``field_spacing`` set, or a fixed image coarser than the patches) uses ``"rotated"``.
        max_rotation_deg: random rotation of every inference patch (``patch_layout: rotated`` only).
        seed: seeds the lattice jitter and rotations (same inputs and seed → same field).
        batch_size: patches per network call.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        precision: the number format of the network's forward passes. ``"auto"`` (default): mixed precision
            where the hardware computes it fast, float16 on a GPU and bfloat16 on a CPU with bfloat16
            instructions (AVX512-BF16 or AMX; each worker decides for itself and the pass's figures say what
            its blocks used), float32 elsewhere; ``"float32"``: float32 everywhere. The polish, the
            integration and every sum stay in float32. On the validation pairs bfloat16 gives the same Dice to
            0.0002 in 8-16 % less time (``docs/method.md``, *Network precision*).
        field_spacing: spacing of the output field grid, a length with its unit (``"50um"``, ``"0.5 mm"``;
            a bare number is in the fixed image's unit). The cascade follows from it: the patch extent is
            halved from the whole-brain extent until the patch spacing is within √2 of it, and the last stage's
            patches are laid on it (:func:`~patchmorph_core.inference.cascade_extents`). Never finer than the
            fixed image's finest voxel (a finer value is raised to it, and the record says so). None (default):
            what the data warrant, the coarser of the two images' finest voxel sizes — for an atlas onto a
            finer brain, the atlas's voxel.
        initial_alignment: ``"affine"`` (fit an affine on coarse copies first,
            :mod:`patchmorph_core.alignment`) or ``"center_of_mass"`` (match the tissue centres only).
        affine_levels / affine_steps: the initial affine's fit grids, as fractions ``E / n`` of the fixed tissue
            extent (coarse to fine), and its Adam steps at each (:mod:`patchmorph_core.alignment`). The atlas job
            adds a finer level, ``(20, 32, 48)`` / ``(60, 30, 30)``, unless its config sets them.
        first_stage: the first cascade stage to run (0 = the whole-brain patch); stages before it are
            skipped. None: 1 when the initial affine was fitted and accepted (it already does the
            whole-brain stage's job; ``docs/method.md``), else 0.
        refine_passes: extra passes of the finest stage, each on a freshly seeded lattice (other jitters
            and rotations) and starting from the previous pass's field, so the finest network sees the
            residual misalignment it left (choice; the paper is silent).
        refine_overlap: lattice overlap of the refinement passes (None: ``overlap``); patches ∝ overlap³.
            The default runs no refinement pass: the polish (``polish_iterations``) does their job faster.
            Passes give a steadier network field (``configs/register_stable.yaml``,
            ``configs/register_refine.yaml``); the measurements are in ``docs/method.md``.
        polish_iterations: greedy similarity steps on the finest field after the network, as a velocity
            composed with the network's field (:mod:`patchmorph_core.polish`; 0: none). Default 10
            (``docs/method.md``, *Polish*).
        polish_gain: update per unit of force (field voxels).
        polish_max_step: largest update of a voxel in one step (field voxels); with ``polish_iterations`` it
            bounds the polish's velocity, hence the halo its integration reads.
        polish_radius: half-width of the similarity's window (field voxels; 2: 5³ voxels).
        polish_sigma: Gaussian smoothing of each update (field voxels).
        polish_correction_sigma: Gaussian smoothing of the accumulated velocity at every step (field voxels).
        polish_similarity: the similarity whose force drives the polish: ``"ncc"`` (local NCC, ANTs SyN's CC
            update; one contrast) or ``"mind"`` (MIND-SSC, any contrasts; :mod:`patchmorph_core.similarity`).
        polish_coarsening: the polish steps on a grid this many times coarser than the field (its velocity and
            residual sampled back trilinearly; the other ``polish_*`` settings are in voxels of that grid).
            None (default): as coarse as the data warrant, the largest factor up to 4 whose spacing stays
            within the coarser of the two images' finest voxels (1 for the default field spacing;
            :func:`~patchmorph_core.polish.coarsening_for`).
        polish_coarse_iterations: polish steps taken first on a grid twice as coarse as the polish's (0: none,
            the default). For two images of one contrast: they take out the residual misalignment at the
            scale of a few field voxels that the fine steps leave (validation: mouse field error 124 → 107 µm
            median); across contrasts they make it worse (``docs/method.md``, *Coarse steps*);
            ``configs/register_one_contrast.yaml``.
        fold_free_updates: make every network pass's averaged update a diffeomorphism before it is composed
            with the coarser field (:func:`~patchmorph_core.inference.fold_free_update`: its first-order
            logarithm integrated by scaling and squaring), so that no pass can fold the field; False composes
            the averaged update as it is (``docs/method.md``, *Fold-free updates*).
        stage_check: score the contrast-robust similarity (MIND-SSC) before and after every network pass and the
            polish, each on its own field grid, record it in the pass's figures, and reject a pass that lowers
            it (:mod:`patchmorph_core.stage_check`); an accepted initial affine is held to the same rule on the
            first pass's grid against the centre-of-mass start.
    """

    weights: str | None = None
    n_stages: int | None = Field(None, ge=1, le=8)
    overlap: float = Field(1.75, ge=1.0, le=8.0)
    patch_layout: Literal["field_grid", "rotated"] = "field_grid"
    max_rotation_deg: float = Field(10.0, ge=0.0, le=180.0)
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "float32"] = "auto"
    field_spacing: float | str | None = None
    initial_alignment: Literal["affine", "center_of_mass"] = "affine"
    affine_levels: tuple[int, ...] = (20, 32)
    affine_steps: tuple[int, ...] = (60, 30)
    first_stage: int | None = Field(None, ge=0, le=7)
    refine_passes: int = Field(0, ge=0, le=8)
    refine_overlap: float | None = Field(None, ge=1.0, le=8.0)
    polish_iterations: int = Field(10, ge=0, le=200)
    fold_free_updates: bool = True
    stage_check: bool = True
    polish_gain: float = Field(1.5, gt=0.0, le=100.0)
    polish_max_step: float = Field(0.25, gt=0.0, le=1.0)
    polish_radius: int = Field(2, ge=1, le=8)
    polish_sigma: float = Field(1.5, ge=0.0, le=8.0)
    polish_correction_sigma: float = Field(0.5, ge=0.0, le=8.0)
    polish_similarity: Literal["ncc", "mind"] = "ncc"
    polish_coarsening: int | None = Field(None, ge=1, le=4)
    polish_coarse_iterations: int = Field(0, ge=0, le=200)

    @field_validator("field_spacing")
    @classmethod
    def _length(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, str):
            from patchmorph_core.spatial import parse_length  # spatial imports torch: only when needed

            parse_length(value, "field_spacing")
        elif value is not None and not value > 0:
            raise ValueError(f"field_spacing {value} must be positive")
        return value

    @model_validator(mode="after")
    def _affine_schedule(self) -> InferenceConfig:
        levels, steps = self.affine_levels, self.affine_steps
        if not levels or len(levels) != len(steps) or min(levels) < 4 or min(steps) < 1:
            raise ValueError(
                f"affine_levels {list(levels)} and affine_steps {list(steps)} must be as many, levels of at least 4 "
                "and steps of at least 1"
            )
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_yaml(path: str | Path, cls: type[ConfigT]) -> ConfigT:
    """Read a YAML file into the config class ``cls``.

    Raises:
        InputError: the file is missing or not YAML, or a key is unknown or a value invalid (the
            message names the file and the key).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist: give the path of a YAML config file.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"config file {path} is not valid YAML ({err}): fix its syntax.") from err
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping of keys to values at the top level.")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or '<top>'!r} ({e['msg'].removeprefix('Value error, ').rstrip('.')})"
            for e in err.errors()
        ]
        where = err.errors()[0]["loc"]
        model = _model_at(cls, where)
        section = ".".join(str(p) for p in where[:-1])
        raise InputError(
            f"config file {path}: {'key' if len(problems) == 1 else f'{len(problems)} keys'} invalid: "
            f"{'; '.join(problems)}; fix or remove {'it' if len(problems) == 1 else 'them'} (valid keys "
            f"{f'under {section!r}' if section and model is not cls else 'at the top'}: {', '.join(model.model_fields)})."
        ) from err


def _model_at(cls: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel]:
    """The config section (pydantic model) that holds the key at ``loc``: the deepest model along it."""
    model = cls
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        inner = [a for a in (field.annotation, *typing.get_args(field.annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return model


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` when a GPU is available, else ``"cpu"``; otherwise ``device`` as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available: use device 'auto' or 'cpu'.")
    return device
