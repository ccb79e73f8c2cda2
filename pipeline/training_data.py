"""Training data for ``patchmorph train``: pairs from files, then :func:`patchmorph_core.training.train`.

Three data kinds (``TrainConfig.data.kind``):

* ``pairs``: listed ``[fixed, moving]`` image paths;
* ``atlas``: one atlas (fixed) against each of ``images`` (moving);
* ``synthseg``: ``images`` (and ``label_sets``) are label maps; every ``refresh_every`` steps two maps of one
  set (possibly the same one) become a synthetic pair: one random intensity per label shared by both images
  (so local NCC applies) or, with probability ``independent_contrast``, one table per image (contrast-robust
  training, with a contrast-robust loss such as ``loss.similarity: mind``), blur, bias field and noise
  (:mod:`patchmorph_core.synth`), skull-stripped for FreeSurfer ids, both maps resampled by a random
  ``resolution_jitter`` factor, and the moving labels deformed by a random smooth field first (the SynthMorph
  idea).

Every kind gives the moving image a random pose (rotation, isotropic scaling, translation about its tissue
centre, ``data.max_*``), so the coarse stage learns to undo large misalignment from the centre-of-mass
start. Images are read whole (training volumes must fit in memory), expressed in ``data.unit``, and
reduced by the integer factor closest to ``data.spacing``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from patchmorph_core import training
from patchmorph_core.config import DataConfig, LabelSet, TrainConfig, load_yaml
from patchmorph_core.errors import InputError
from patchmorph_core.labels import central_block, check_whole_numbers
from patchmorph_core.model import read_checkpoint
from patchmorph_core.sampling import intensity_range, normalize
from patchmorph_core.source import MultiscaleImage, downsample, downsampled_grid
from patchmorph_core.spatial import Grid, random_rotation, read_box
from patchmorph_core.synth import downsample_labels, random_smooth_field, skull_strip_mask, synthesize_image
from patchmorph_core.training import TrainPair, TrainResult, loss_csv_path
from pipeline.checks import check_checkpoint, check_outputs

log = logging.getLogger(__name__)


def read_volume(
    path: str | Path, unit: str, spacing: float | None, labels: bool = False
) -> tuple[np.ndarray, Grid]:
    """Read a whole NIfTI / NRRD / OME-Zarr volume in ``unit``, reduced by the integer factor nearest ``spacing``.

    Returns:
        ``(array (Z, Y, X), grid)``; labels keep their ids (block mode), images are block means.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        from pipeline.importers import load_nifti

        array, grid = load_nifti(path)
    elif name.endswith(".nrrd"):
        from pipeline.importers import load_nrrd

        array, grid = load_nrrd(path)
    else:
        from pipeline.ngff import read_image

        image = read_image(str(path)).with_unit(unit)
        level = image.level_for_spacing(spacing) if spacing else image.levels[0]
        array, grid = level.array, level.grid
    if labels:
        check_label_map(array, path)  # before an OME-Zarr level is read whole
    if not isinstance(array, np.ndarray):
        array = read_box(array, tuple(slice(0, n) for n in grid.shape))
    grid = grid.with_unit(unit)
    if spacing:
        factors = tuple(max(1, round(spacing / s)) for s in grid.spacing)
        if any(f > 1 for f in factors):
            array = downsample_labels(array, factors) if labels else downsample(array, factors)
            grid = downsampled_grid(grid, factors, array.shape)
    return np.asarray(array), grid


def check_label_map(array: Any, path: str | Path) -> None:
    """Refuse an intensity image given as a label map (``data.images`` / ``label_sets`` of ``kind: synthseg``).

    Checked at the resolution read, on the block at the map's centre (:func:`~patchmorph_core.labels.central_block`:
    one bounded read, as ``warp --labels`` checks; a label map can be larger than memory): non-integer values; or
    both few equal neighbours (under 60 % of the face-adjacent tissue voxel pairs share a value: label maps hold
    72-90 %, microscopy and MRI templates about 46 %) and differing neighbours whose values correlate (over 0.8: an
    intensity changes smoothly, label ids are arbitrary: 0.2-0.8 in label maps, 0.87-0.96 in images).

    Args:
        array: ``(Z, Y, X)`` numpy, zarr, dask or TensorStore array (only its central block is read).
        path: the file, named in the error.

    Raises:
        InputError: the file looks like an intensity image.
    """
    values = central_block(array)
    check_whole_numbers(
        values, f"training label map {path}", "it is an intensity image, not a label map; list label maps (one "
        "integer id per structure) under data.images or data.label_sets.",
    )  # fmt: skip
    equal = pairs = 0
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    for axis in range(3):
        a = np.moveaxis(values, axis, 0)
        both = (a[1:] != 0) & (a[:-1] != 0)
        same = a[1:] == a[:-1]
        equal += int(np.count_nonzero(same & both))
        pairs += int(np.count_nonzero(both))
        differ = both & ~same
        first.append(a[1:][differ].astype(np.float64))
        second.append(a[:-1][differ].astype(np.float64))
    x, y = np.concatenate(first), np.concatenate(second)
    if pairs == 0 or x.size < 2 or equal / pairs >= 0.6 or np.std(x) == 0 or np.std(y) == 0:
        return
    correlation = float(np.corrcoef(x, y)[0, 1])
    if correlation > 0.8:
        raise InputError(
            f"training label map {path} looks like an intensity image ({100 * equal / pairs:.0f} % of neighbouring "
            f"voxels share a value, and differing neighbours correlate at {correlation:.2f}): list its label map "
            "(one integer id per structure, e.g. an atlas annotation) under data.images or data.label_sets."
        )


def random_pose(
    rng: np.random.Generator, centre: np.ndarray, data: DataConfig, extent: float | None = None
) -> np.ndarray:
    """4×4 world→world pose ``T(c + t) R S T(-c)`` with random rotation, isotropic scale and translation
    (at most ``data.max_translation``, or ``data.max_translation_fraction × extent`` when both are given);
    ``centre`` ``c`` is a ``(3,)`` world point ``(z, y, x)`` and ``extent`` a length, both in ``data.unit``."""
    rotation = random_rotation(rng, data.max_rotation_deg)
    scale = float(np.exp(rng.uniform(-data.max_scaling, data.max_scaling)))
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * scale
    limit = data.max_translation
    if data.max_translation_fraction is not None and extent is not None:
        limit = data.max_translation_fraction * extent
    shift = rng.uniform(-limit, limit, size=3)
    matrix[:3, 3] = centre + shift - matrix[:3, :3] @ centre
    return matrix


def _image_pyramid(array: np.ndarray, grid: Grid) -> MultiscaleImage:
    """Normalised (0..1) in-memory pyramid of an intensity volume."""
    image = MultiscaleImage.from_array(np.asarray(array, dtype=np.float32), grid)
    lo, hi = intensity_range(image)
    return MultiscaleImage.from_array(normalize(array, lo, hi), grid)


@dataclass
class FilePairs:
    """Pairs of intensity volumes read once; each call picks one and gives the moving image a random pose."""

    pairs: list[tuple[tuple[np.ndarray, Grid], tuple[np.ndarray, Grid]]]
    data: DataConfig
    alignment: str = "center_of_mass"

    def __call__(self, rng: np.random.Generator) -> TrainPair:
        (fa, fg), (ma, mg) = self.pairs[int(rng.integers(len(self.pairs)))]
        fixed = _image_pyramid(fa, fg)
        moving = _image_pyramid(ma, mg)
        pose = random_pose(rng, mg.center, self.data)
        return TrainPair.from_images(fixed, moving.transformed(pose), alignment=self.alignment)


@dataclass(frozen=True)
class LabelVolume:
    """A label map held for synthesis: ``labels`` ``(Z, Y, X)`` on ``grid``; ``skull_strip`` as in
    :class:`~patchmorph_core.config.LabelSet`."""

    labels: np.ndarray
    grid: Grid
    skull_strip: bool = True


@dataclass
class SynthPairs:
    """Synthetic pairs from label maps (see module doc), a new pair every ``data.refresh_every`` calls.

    ``sets`` holds the label maps of each :class:`~patchmorph_core.config.LabelSet`, ``weights`` the sets'
    probabilities; both images of a pair come from one set.
    """

    sets: list[list[LabelVolume]]
    data: DataConfig
    alignment: str = "center_of_mass"
    weights: tuple[float, ...] = ()
    _calls: int = 0
    _pair: TrainPair | None = None
    _pair_rng: dict | None = None

    def __call__(self, rng: np.random.Generator) -> TrainPair:
        if self._pair is None or self._calls % self.data.refresh_every == 0:
            self._pair_rng = rng.bit_generator.state
            self._pair = self.make_pair(rng)
        self._calls += 1
        return self._pair

    def state(self) -> dict:
        """What a resumed run needs to go on as one run would (kept in the checkpoint): the calls so far and the
        random state the current pair was drawn from (a resume between two refreshes keeps that pair)."""
        return {"calls": self._calls, "pair_rng": self._pair_rng}

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`: the current pair is drawn again from its random state (a generator of its
        own: the run's generator is restored separately)."""
        self._calls = int(state["calls"])
        self._pair_rng, self._pair = state["pair_rng"], None
        if self._pair_rng is not None and self._calls % self.data.refresh_every != 0:
            rng = np.random.default_rng()
            rng.bit_generator.state = self._pair_rng
            self._pair = self.make_pair(rng)

    def make_pair(self, rng: np.random.Generator) -> TrainPair:
        """Draw a set and two of its label maps, the contrast(s), a resolution, a smooth deformation and a pose."""
        fixed, moving = self._draw_volumes(rng)
        zoom = float(np.exp(rng.uniform(-self.data.resolution_jitter, self.data.resolution_jitter)))
        fl, fg = rescale_labels(fixed.labels, fixed.grid, zoom)
        ml, mg = rescale_labels(moving.labels, moving.grid, zoom)
        present = np.union1d(np.unique(fl), np.unique(ml))
        tables = [{int(label): float(rng.uniform()) for label in present}]
        independent = rng.uniform() < self.data.independent_contrast
        tables.append({int(label): float(rng.uniform()) for label in present} if independent else tables[0])
        ml = self._deform(ml, rng)
        images = []
        for lab, grid, table in ((fl, fg, tables[0]), (ml, mg, tables[1])):
            image = synthesize_image(
                lab,
                rng,
                table,
                blur_sigma_vox=float(rng.uniform(0.5, 1.0)),
                bias_strength=float(rng.uniform(0.0, 0.3)),
                noise_std=float(rng.uniform(0.0, 0.05)),
                skull_strip=fixed.skull_strip,
            )
            images.append(MultiscaleImage.from_array(image, grid))
        pose = random_pose(rng, mg.center, self.data, _tissue_extent(ml, mg))
        return TrainPair.from_images(
            images[0], images[1].transformed(pose), alignment=self.alignment, same_contrast=not independent
        )

    def _draw_volumes(self, rng: np.random.Generator) -> tuple[LabelVolume, LabelVolume]:
        """One set by ``weights``; two of its maps (the same one with probability 0.2)."""
        weights = np.asarray(self.weights or [1.0] * len(self.sets), dtype=float)
        volumes = self.sets[int(rng.choice(len(self.sets), p=weights / weights.sum()))]
        i = int(rng.integers(len(volumes)))
        j = i if rng.uniform() < 0.2 or len(volumes) == 1 else int(rng.integers(len(volumes)))
        return volumes[i], volumes[j]

    def _deform(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Labels warped (nearest) by a random smooth field of at most ``deform_disp_vox`` voxels."""
        amplitude = float(rng.uniform(0.0, self.data.deform_disp_vox))
        if amplitude <= 0:
            return labels
        disp = random_smooth_field(labels.shape, rng, amplitude, smoothness_vox=8.0)
        index = np.indices(labels.shape, dtype=np.float32) + disp
        return ndimage.map_coordinates(labels, index, order=0, mode="nearest")


def rescale_labels(labels: np.ndarray, grid: Grid, zoom: float) -> tuple[np.ndarray, Grid]:
    """Resample a ``(Z, Y, X)`` label map on ``grid`` (nearest) to about ``zoom`` times as many voxels per axis
    over the same world box.

    Returns:
        ``(labels', grid')``: ``(Z', Y', X')`` labels with ``n' = max(2, round(n · zoom))`` per axis (the map
        itself when ``zoom`` is within 0.001 of 1); ``grid'`` spans the same world box (first and last voxel centres kept, the
        spacing scaled by ``(n − 1) / (n' − 1)`` per axis).
    """
    if abs(zoom - 1.0) < 1e-3:
        return labels, grid
    shape = np.asarray(labels.shape)
    new_shape = np.maximum(np.rint(shape * zoom).astype(int), 2)
    factors = (shape - 1) / (new_shape - 1)
    index = np.indices(tuple(new_shape), dtype=np.float32) * factors[:, None, None, None].astype(np.float32)
    resampled = ndimage.map_coordinates(labels, index, order=0, mode="nearest")
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factors)
    return resampled, Grid(tuple(int(n) for n in new_shape), grid.affine @ scale, grid.unit)


def _tissue_extent(labels: np.ndarray, grid: Grid) -> float:
    """Largest world extent of the non-zero labels' box."""
    index = np.argwhere(labels > 0)
    if index.size == 0:
        return float(np.max(grid.spacing * np.asarray(grid.shape)))
    corners = grid.index_to_world(np.stack([index.min(axis=0), index.max(axis=0)]).astype(float))
    return float(np.max(np.abs(corners[1] - corners[0])))


def renumber_labels(labels: np.ndarray) -> np.ndarray:
    """Label ids renumbered ``1..K`` in ascending order, 0 kept as background (``int32``, ``labels``' shape, e.g.
    ``(Z, Y, X)``): atlases such as the Allen CCF use ids up to ~10⁹, and a per-id intensity table must stay
    small."""
    ids, inverse = np.unique(labels, return_inverse=True)
    renumbered = inverse.reshape(labels.shape).astype(np.int32)
    return renumbered + (1 if ids[0] != 0 else 0)


def crop_to_brain(labels: np.ndarray, grid: Grid, margin: int = 4) -> tuple[np.ndarray, Grid]:
    """Crop a ``(Z, Y, X)`` label map on ``grid`` to its skull-stripped brain box plus ``margin`` voxels per side
    (clipped to the array); returns the ``(Z', Y', X')`` crop and its grid (``grid`` cropped: same spacing and
    unit). A map with no brain label comes back whole."""
    index = np.argwhere(skull_strip_mask(labels))
    if index.size == 0:
        return labels, grid
    start = np.maximum(index.min(axis=0) - margin, 0)
    stop = np.minimum(index.max(axis=0) + margin + 1, labels.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    return labels[box], grid.crop(start, stop)


def _label_volume(path: Path, unit: str, label_set: LabelSet) -> LabelVolume:
    """Read one label map of ``label_set``: cropped to the brain (FreeSurfer ids) or renumbered (other atlases)."""
    labels, grid = read_volume(path, unit, label_set.spacing, labels=True)
    if label_set.skull_strip:
        labels, grid = crop_to_brain(labels, grid)
    else:
        labels = renumber_labels(labels)
    return LabelVolume(np.asarray(labels), grid, label_set.skull_strip)


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    p = p if p.is_absolute() else base / p
    if not p.exists():
        raise InputError(f"training input {p} does not exist: fix its path in the training config.")
    return p


def build_source(data: DataConfig, base: Path, alignment: str = "center_of_mass") -> FilePairs | SynthPairs:
    """Read the training volumes named by ``data`` (paths relative to ``base``) into a pair source whose
    pairs start from ``alignment`` (``TrainConfig.initial_alignment``)."""
    if data.kind == "synthseg":
        sets = list(data.label_sets)
        if data.images:
            sets.insert(0, LabelSet(images=data.images, spacing=data.spacing, skull_strip=True))
        if not sets or not all(label_set.images for label_set in sets):
            raise InputError(
                "data.images and data.label_sets give no label maps: list the label maps (NIfTI, NRRD) to "
                "synthesize training pairs from."
            )
        volumes = [[_label_volume(_resolve(p, base), data.unit, label_set) for p in label_set.images] for label_set in sets]
        return SynthPairs(volumes, data, alignment, tuple(label_set.weight for label_set in sets))
    if data.kind == "atlas":
        if data.atlas is None or not data.images:
            raise InputError(
                "data.kind 'atlas' needs data.atlas and data.images: give the atlas and the brains."
            )
        atlas = read_volume(_resolve(data.atlas, base), data.unit, data.spacing)
        pairs = [(atlas, read_volume(_resolve(p, base), data.unit, data.spacing)) for p in data.images]
        return FilePairs(pairs, data, alignment)
    if not data.pairs:
        raise InputError("data.kind 'pairs' needs data.pairs: give a list of [fixed, moving] image paths.")
    pairs = [
        (
            read_volume(_resolve(f, base), data.unit, data.spacing),
            read_volume(_resolve(m, base), data.unit, data.spacing),
        )
        for f, m in data.pairs
    ]
    return FilePairs(pairs, data)


def run_training(
    config_path: str | Path, *, resume: bool = False, steps: int | None = None, overwrite: bool = False
) -> TrainResult:
    """Load the YAML config, read the data and train; relative data and ``init_weights`` paths are relative
    to the YAML's folder.

    The checkpoint path is taken as given (relative to the working directory). An existing checkpoint is
    continued with ``resume`` (or the config's ``resume``), replaced with ``overwrite``, else refused
    (:func:`pipeline.checks.check_checkpoint`); it may not be one of the training inputs.
    """
    config_path = Path(config_path)
    config = load_yaml(config_path, TrainConfig)
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps} is invalid: give a positive number of training steps.")
    update = {"resume": config.resume or resume, "steps": config.steps if steps is None else steps}
    config = config.model_copy(update=update)
    base = config_path.resolve().parent
    data = config.data
    relative = {"init_weights": config.init_weights, "data.atlas": data.atlas}
    relative.update({f"data.images[{i}]": p for i, p in enumerate(data.images)})
    relative.update({f"data.pairs[{i}][{j}]": p for i, pair in enumerate(data.pairs) for j, p in enumerate(pair)})
    anchored = {k: None if v is None else base / v for k, v in relative.items()}  # base / absolute = absolute
    anchored["config"] = config_path
    checkpoint = Path(config.checkpoint)
    check_outputs(inputs=anchored, outputs={"checkpoint": checkpoint, "loss curve": loss_csv_path(checkpoint)})
    if config.init_weights is not None:
        config.init_weights = str(_resolve(config.init_weights, base))
    check_checkpoint(checkpoint, resume=config.resume, overwrite=overwrite)
    if config.resume and checkpoint.is_file():
        payload = read_checkpoint(checkpoint)
        done = int(payload["step"])
        if done > config.steps:
            raise InputError(
                f"checkpoint {checkpoint} has {done} steps already, the run asks for {config.steps} in all: give "
                f"--steps above {done} to train it further (steps count from the start of the training)."
            )
        if done == config.steps:  # a finished run started again (a deployment's rerun, say): nothing to do
            log.info("%s has its %d steps already: nothing to train", checkpoint, done)
            extra = payload["extra"]
            return training.TrainResult(
                done, float(extra.get("loss", "nan")), 0.0, checkpoint, training.loss_csv_path(checkpoint)
            )
    source = build_source(config.data, base, config.initial_alignment)
    return training.train(config, source)
