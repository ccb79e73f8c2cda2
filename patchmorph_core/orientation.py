"""Orientation plausibility: would the moving image fit the fixed one clearly better after another axis
permutation or flip of its world frame?

A wrong orientation code (an atlas read as ``asr`` instead of ``rsa``, a brain's ``pls`` given as ``psl``)
puts the moving image in a frame rotated by 90° or mirrored relative to the fixed one. The registration
cannot undo that and runs to a confident, wrong answer. Before heavy work the global NCC of the initial
alignment's coarse copies (:meth:`~patchmorph_core.alignment.FitLevel.ncc`, both normalised to 0..1; an NCC
so that the rule below has a fixed scale) is measured for each of the 48 signed axis permutations ``R`` of
the moving frame, about the tissue centres: the fixed world point ``x`` maps to ``c_m + R (x − c_f)``.
``R = I`` is the orientation as given.

Scoring (cheap: one coarse level, about 20 samples across the tissue):

1. every ``R`` with the tissue centres matched (one NCC each);
2. the :data:`REFINE` best of them and ``I``: a short affine fit from that start (the initial alignment's
   model, :data:`REFINE_STEPS` Adam steps), so that a difference in size or shape between the brains does
   not favour a wrong axis order; the refined NCC decides.

Another ``R`` *fits clearly better* when its refined NCC exceeds the given orientation's by at least
:data:`MIN_GAIN` and leaves at most ``1 / RATIO`` of the given orientation's dissimilarity ``1 − NCC``
(:data:`RATIO`): a relative rule, so that on pairs of low similarity (other contrasts) small differences do
not count. Brains are nearly mirror-symmetric left to right, so a left-right flip of the right answer scores
about the same and never passes; the check finds permutations and flips of the anterior-posterior and
dorsal-ventral axes, which change the shape the similarity sees. ``benchmarks/orientation_check.py``
measured the rule on real brains (the mouse STP brain against the Allen template, three human pairs): the
right codes scored ratios of 1.0-1.01 against their best alternative, every one of the 184 wrong codes
1.69 or more (gain 0.046 or more), and the orientation found was right (up to a left-right mirror) in all.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from patchmorph_core.alignment import LEARNING_RATE, LEVELS, Adam, FitLevel, one_torch_thread, warp_points
from patchmorph_core.sampling import tissue_bounds, tissue_center
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import LEFT_RIGHT_MIRROR, orientation_code

REFINE = 3
"""Candidates (besides the given orientation) refined by a short affine fit."""

REFINE_STEPS = 40
"""Adam steps of the short affine fit of each refined candidate."""

MIN_GAIN = 0.02
"""A candidate fits *clearly better* only when its refined NCC exceeds the given orientation's by this much..."""

RATIO = 1.4
"""... and the given orientation's ``1 − NCC`` is at least this many times the candidate's."""


def signed_permutations() -> list[np.ndarray]:
    """The 48 ``(3, 3)`` matrices that permute and flip axes (rotations and mirrorings), identity first."""
    out = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[list(range(3)), list(order)] = signs
            out.append(matrix)
    return out


@dataclass(frozen=True)
class CandidateScore:
    """One orientation of the moving frame: ``matrix`` ``R`` (fixed world offsets → moving world offsets about
    the tissue centres), the NCC with centres matched, and the NCC after the short affine fit (None when not
    refined)."""

    matrix: np.ndarray
    ncc: float
    refined: float | None = None

    @property
    def score(self) -> float:
        """The refined NCC when there is one, else the centred one."""
        return self.ncc if self.refined is None else self.refined

    @property
    def is_identity(self) -> bool:
        """True for the orientation as given."""
        return bool(np.array_equal(self.matrix, np.eye(3)))


@dataclass(frozen=True)
class OrientationCheck:
    """The scores of the 48 orientations of the moving frame (see the module docstring).

    Attributes:
        given: the orientation as given (``R = I``), refined.
        best: the best-scoring orientation after refinement (may be ``given``).
        candidates: all 48, best first.
        seconds: wall time of the check.
    """

    given: CandidateScore
    best: CandidateScore
    candidates: tuple[CandidateScore, ...]
    seconds: float

    @property
    def fits_better(self) -> bool:
        """True when another orientation fits clearly better (:data:`MIN_GAIN`, :data:`RATIO`) than the given one."""
        gain = self.best.score - self.given.score
        return (
            not self.best.is_identity
            and gain >= MIN_GAIN
            and 1.0 - self.given.score >= RATIO * (1.0 - self.best.score)
        )

    def suggested_codes(
        self, fixed_direction: np.ndarray, moving_direction: np.ndarray
    ) -> tuple[str | None, str | None]:
        """The orientation codes that would make :attr:`best` the identity: ``(fixed code, moving code)``,
        each for changing that image alone; None where the image's grid is oblique (no code).

        Brains are nearly mirror-symmetric, so :attr:`best` ``R`` and its left-right mirror fit about equally, and
        which of the two wins is chance: ``F R`` for a code of the fixed image (the moving image's frame, taken as
        right, mirrored; ``F`` flips the left-right world axis), ``R F`` for one of the moving image. Each code is
        the one of the two that keeps the image's left-right letter as given (``l`` or ``r``; the two codes differ
        in that letter alone), so the images' word alone never swaps the hemispheres."""
        best, mirror = self.best.matrix, LEFT_RIGHT_MIRROR
        fixed = [orientation_code(r @ np.asarray(fixed_direction)) for r in (best, mirror @ best)]
        moving = [orientation_code(r.T @ np.asarray(moving_direction)) for r in (best, best @ mirror)]
        return (
            _keeping_left_right(fixed, orientation_code(np.asarray(fixed_direction))),
            _keeping_left_right(moving, orientation_code(np.asarray(moving_direction))),
        )

    def record(self) -> dict[str, object]:
        """JSON-ready summary: the given and best scores and the five best candidates."""

        def entry(candidate: CandidateScore) -> dict[str, object]:
            return {
                "matrix": candidate.matrix.astype(int).tolist(),
                "ncc_centred": round(candidate.ncc, 4),
                "ncc_refined": None if candidate.refined is None else round(candidate.refined, 4),
            }

        return {
            "metric": "global NCC of coarse copies (the initial alignment's)",
            "rule": {"min_gain": MIN_GAIN, "ratio": RATIO},
            "given": entry(self.given),
            "best": entry(self.best),
            "fits_better": self.fits_better,
            "top": [entry(c) for c in self.candidates[:5]],
            "seconds": round(self.seconds, 3),
        }


def _refine(
    level: FitLevel, centre_f: torch.Tensor, centre_m: torch.Tensor, extent: float, rotation: np.ndarray
) -> float:
    """NCC after :data:`REFINE_STEPS` Adam steps of ``c_m + (R + B)(x − c_f) + E t`` from ``B = 0, t = 0``."""
    base = torch.as_tensor(rotation - np.eye(3), dtype=torch.float32)
    linear = torch.zeros(3, 3, requires_grad=True)
    shift = torch.zeros(3, requires_grad=True)
    optimizer = Adam([linear, shift], lr=LEARNING_RATE)
    for _ in range(REFINE_STEPS):
        loss = -level.ncc(warp_points(level.points, centre_f, centre_m, extent, base + linear, shift))
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(level.ncc(warp_points(level.points, centre_f, centre_m, extent, base + linear, shift)))


def _keeping_left_right(codes: list[str | None], given: str | None) -> str | None:
    """The one of ``codes`` (the best's and its mirror's) that holds ``given``'s left-right letter; the first when
    ``given`` has no code or not exactly one does."""
    if given is None:
        return codes[0]
    letter = next(c for c in given if c in "lr")
    keeping = [code for code in codes if code is not None and letter in code]
    return keeping[0] if len(keeping) == 1 else codes[0]


def check_orientation(fixed: MultiscaleImage, moving: MultiscaleImage) -> OrientationCheck:
    """Score the 48 orientations of ``moving``'s frame against ``fixed`` (see the module docstring).

    Runs on one CPU thread, like :func:`~patchmorph_core.alignment.fit_affine`, so that every process gets
    the same scores.

    Args:
        fixed: fixed image.
        moving: moving image, in the fixed image's unit.
    """
    with one_torch_thread():
        return _check_orientation(fixed, moving)


def _check_orientation(fixed: MultiscaleImage, moving: MultiscaleImage) -> OrientationCheck:
    tic = time.perf_counter()
    low, high = tissue_bounds(fixed)
    extent = float(np.max(high - low))
    level = FitLevel.build(fixed, moving, extent / LEVELS[0])
    centre_f = torch.as_tensor(tissue_center(fixed), dtype=torch.float32)
    centre_m = torch.as_tensor(tissue_center(moving), dtype=torch.float32)
    zero_shift = torch.zeros(3)
    scores = []
    with torch.no_grad():
        for rotation in signed_permutations():
            linear = torch.as_tensor(rotation - np.eye(3), dtype=torch.float32)
            ncc = float(level.ncc(warp_points(level.points, centre_f, centre_m, extent, linear, zero_shift)))
            scores.append(CandidateScore(rotation, ncc))
    ranked = sorted(scores, key=lambda c: -c.ncc)
    chosen = {id(c) for c in ranked[:REFINE]} | {id(scores[0])}
    refined = [
        CandidateScore(c.matrix, c.ncc, _refine(level, centre_f, centre_m, extent, c.matrix))
        if id(c) in chosen
        else c
        for c in scores
    ]
    candidates = tuple(sorted(refined, key=lambda c: (c.refined is None, -c.score)))
    return OrientationCheck(refined[0], candidates[0], candidates, time.perf_counter() - tic)
