"""Orientation plausibility: would the moving image fit the fixed one clearly better after another axis
permutation or flip of its world frame?

A wrong orientation code (an atlas read as ``asr`` instead of ``rsa``, a brain's ``pls`` given as ``psl``)
puts the moving image in a frame rotated by 90° or mirrored relative to the fixed one. The registration
cannot undo that and runs to a confident, wrong answer. Before heavy work the initial alignment's objective
on its coarse copies (:meth:`~patchmorph_core.alignment.FitLevel.similarity`: the mean squared difference of
the two images' MIND-SSC descriptors, here called the *dissimilarity*, lower is better) is measured for each
of the 48 signed axis permutations ``R`` of the moving frame, about the tissue centres: the fixed world point
``x`` maps to ``c_m + R (x − c_f)``. ``R = I`` is the orientation as given. The descriptors depend on the local
structure, not on how the two intensities relate, so the check works across contrasts (an MRI-style atlas
onto a microscopy brain), where the global NCC it replaced barely told orientations apart (a wrong code 0.77,
the right one 0.81, on the user trial that showed it).

Scoring (cheap: one coarse level, about 20 samples across the tissue):

1. every ``R`` with the tissue centres matched (one dissimilarity each);
2. the given ``I`` and the :data:`REFINE` best others *except the given's left-right mirror*: a short affine
   fit from that start (the initial alignment's model and objective, :data:`REFINE_STEPS` Adam steps of
   :data:`REFINE_RATE`), so that a difference in size or shape between the brains does not favour a wrong
   axis order; the refined dissimilarity decides.

Another ``R`` *fits clearly better* when its refined dissimilarity is below the given orientation's by at
least :data:`MIN_GAIN` and the given's is at least :data:`RATIO` times it: a relative rule, as the level of
the dissimilarity depends on the pair (contrasts, noise, resolution). Brains are nearly mirror-symmetric left
to right, so the given orientation's left-right mirror scores about the same whether the code is right or
wrong: it is no rival (and the codes suggested keep the given left or right anyway); the check finds
permutations and flips of the anterior-posterior and dorsal-ventral axes, which change the shape the
descriptors see. ``benchmarks/orientation_check.py`` chose the constants on real brains
(``docs/orientation_check.md``; the mouse STP brain against the Allen template and against two stand-ins of
another contrast, the annotation painted one random intensity per structure and the template inverted; three
human pairs with one contrast and with two): the right codes scored 0.33-0.79 times their best rival's
dissimilarity (none refused), every one of the 414 wrong codes 1.27 or more times the orientation found (a
gain of 0.0037 or more), and the orientation found was right (up to a left-right mirror) in all. The global
NCC rule it replaced found all 184 wrong codes of one contrast but fired on 82 of the 230 of two, naming 59
of them right, and a right code of two contrasts came near its refusal (a ratio of 1.23 to the rule's 1.4).
A check takes 0.6-0.8 s on one core (the NCC's 0.3-0.7 s).
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

REFINE = 2
"""Candidates (besides the given orientation, never its left-right mirror) refined by a short affine fit."""

REFINE_STEPS = 20
"""Adam steps of the short affine fit of each refined candidate."""

REFINE_RATE = 3 * LEARNING_RATE
"""Adam step size of the short fit (three times the initial alignment's: the fit is short)."""

MIN_GAIN = 0.002
"""A candidate fits *clearly better* only when its refined dissimilarity is below the given orientation's by at
least this much (mean squared difference of MIND-SSC descriptors, each in ``(0, 1]``)..."""

RATIO = 1.1
"""... and the given orientation's dissimilarity is at least this many times the candidate's."""


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
    the tissue centres), the dissimilarity (mean squared difference of the MIND-SSC descriptors; lower is better)
    with centres matched, and the dissimilarity after the short affine fit (None when not refined)."""

    matrix: np.ndarray
    centred: float
    refined: float | None = None

    @property
    def dissimilarity(self) -> float:
        """The refined dissimilarity when there is one, else the centred one."""
        return self.centred if self.refined is None else self.refined

    @property
    def is_identity(self) -> bool:
        """True for the orientation as given."""
        return bool(np.array_equal(self.matrix, np.eye(3)))


@dataclass(frozen=True)
class OrientationCheck:
    """The scores of the 48 orientations of the moving frame (see the module docstring).

    Attributes:
        given: the orientation as given (``R = I``), refined.
        best: the orientation of lowest dissimilarity after refinement (may be ``given``).
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
        given, best = self.given.dissimilarity, self.best.dissimilarity
        return not self.best.is_identity and given - best >= MIN_GAIN and given >= RATIO * best

    def suggested_codes(
        self, fixed_direction: np.ndarray, moving_direction: np.ndarray
    ) -> tuple[str | None, str | None]:
        """The orientation codes that would make :attr:`best` the identity: ``(fixed code, moving code)``,
        each for changing that image alone; None where the image's grid is oblique (no code).
        ``fixed_direction`` and ``moving_direction`` are the images' ``(3, 3)`` :attr:`Grid.direction` matrices
        (unit direction cosines of the array axes ``(z, y, x)``, as columns, in world coordinates).

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
                "centred": round(candidate.centred, 5),
                "refined": None if candidate.refined is None else round(candidate.refined, 5),
            }

        return {
            "metric": "MIND-SSC dissimilarity of coarse copies (the initial alignment's objective; lower is better)",
            "rule": {"min_gain": MIN_GAIN, "ratio": RATIO},
            "given": entry(self.given),
            "best": entry(self.best),
            "fits_better": self.fits_better,
            "top": [entry(c) for c in self.candidates[:5]],
            "seconds": round(self.seconds, 3),
        }


def refined_dissimilarity(
    level: FitLevel, centre_f: torch.Tensor, centre_m: torch.Tensor, extent: float, rotation: np.ndarray
) -> float:
    """Dissimilarity after :data:`REFINE_STEPS` Adam steps of ``c_m + (R + B)(x − c_f) + E t`` from ``B = 0,
    t = 0`` (the initial alignment's objective, :meth:`~patchmorph_core.alignment.FitLevel.similarity`)."""
    base = torch.as_tensor(rotation - np.eye(3), dtype=torch.float32)
    linear = torch.zeros(3, 3, requires_grad=True)
    shift = torch.zeros(3, requires_grad=True)
    optimizer = Adam([linear, shift], lr=REFINE_RATE)
    for _ in range(REFINE_STEPS):
        loss = -level.similarity(warp_points(level.points, centre_f, centre_m, extent, base + linear, shift))
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return -float(
            level.similarity(warp_points(level.points, centre_f, centre_m, extent, base + linear, shift))
        )


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
            world = warp_points(level.points, centre_f, centre_m, extent, linear, zero_shift)
            scores.append(CandidateScore(rotation, -float(level.similarity(world))))
    rivals = [c for c in scores[1:] if not np.array_equal(c.matrix, LEFT_RIGHT_MIRROR)]
    chosen = {id(c) for c in sorted(rivals, key=lambda c: c.centred)[:REFINE]} | {id(scores[0])}
    refined = [
        CandidateScore(c.matrix, c.centred, refined_dissimilarity(level, centre_f, centre_m, extent, c.matrix))
        if id(c) in chosen
        else c
        for c in scores
    ]
    candidates = tuple(sorted(refined, key=lambda c: (c.refined is None, c.dissimilarity)))
    return OrientationCheck(refined[0], candidates[0], candidates, time.perf_counter() - tic)
