"""The one registration driver: the in-memory registration (threads, numpy, one chunk) on stub and tiny
models; its equality with the chunked run on disk is in test_chunked.py."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from registration_stubs import ConstantUpdate, FoldingUpdate, blob_pair

from patchmorph_core import inference
from patchmorph_core.alignment import AffineFit
from patchmorph_core.config import InferenceConfig, ModelConfig
from patchmorph_core.displacement import AffineDisplacement
from patchmorph_core.inference import StageFixedImages, plan_registration
from patchmorph_core.metrics import jacobian_determinant
from patchmorph_core.model import PatchMorph
from patchmorph_core.sampling import initial_translation
from patchmorph_core.source import Level
from patchmorph_core.stage_check import StageScorer
from pipeline.register import register_arrays


def test_register_arrays_stub_adds_updates_across_stages() -> None:
    fixed, moving = blob_pair()
    model = ConstantUpdate((0.25, 0.5, -0.5))
    config = InferenceConfig(
        batch_size=8,
        device="cpu",
        max_rotation_deg=0.0,
        initial_alignment="center_of_mass",
        overlap=2.0,
        refine_passes=0,
        polish_iterations=0,  # the network's updates alone (the polish has its own tests)
        n_stages=2,
        stage_check=False,  # arithmetic: keep passes that move the blob off (the check has its own tests)
        fold_free_updates=False,  # the averaged updates as they are (fold_free_update has its own tests)
    )
    result = register_arrays(model, fixed, moving, config, show_progress=False)
    matrix = np.array(result.info["initial_matrix"])
    assert (
        np.allclose(matrix[:3, :3], np.eye(3))
        and result.info["initial_alignment"]["method"] == "center_of_mass"
    )
    initial = matrix[:3, 3]
    assert np.allclose(initial, [2.0, -1.5, 1.0], atol=0.3)  # tissue centres of mass, in the fixed unit (mm)
    assert result.grid.unit == "millimeter" and result.field.shape == (3, *result.grid.shape)
    assert [s["stage"] for s in result.info["stages"]] == [0, 1]
    step = np.array([0.25, 0.5, -0.5])
    # each stage adds v (u_s = v + u_{s-1}); far background keeps (an interpolation of) the coarser field
    low, high = np.minimum(initial, initial + 2 * step), np.maximum(initial, initial + 2 * step)
    values = result.field.reshape(3, -1)
    assert np.all((values >= low[:, None] - 1e-4) & (values <= high[:, None] + 1e-4))
    deviation = np.abs(result.field - (initial + 2 * step)[:, None, None, None]).max(axis=0)
    tissue = fixed.sample(result.grid.points().reshape(-1, 3), 1.0).reshape(result.grid.shape) > 50.0
    assert tissue.sum() > 300 and np.all(deviation[tissue] < 1e-4)  # the tissue got both updates
    # identical estimates: no spread, to the float32 sums' resolution (about 4e-4 of |v| = 0.75 mm)
    assert np.all(result.uncertainty[tissue] < 1e-3)


def test_only_a_finest_pass_without_polish_sums_the_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks sum ``w·|v|²`` only where the spread is the output's uncertainty map (the finest pass when no
    polish follows); with the polish every pass keeps a fifth less, and the map is the polish's residual."""
    import pipeline.driver as driver

    calls: list[bool] = []
    real = driver.estimate_and_accumulate

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs["spread"])
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "estimate_and_accumulate", recording)
    fixed, moving = blob_pair()
    config = InferenceConfig(
        device="cpu", max_rotation_deg=0.0, initial_alignment="center_of_mass", n_stages=2, stage_check=False
    )
    spreads = {}
    for steps in (0, 3):
        calls.clear()
        result = register_arrays(ConstantUpdate((0.25, 0.5, -0.5)), fixed, moving, config.model_copy(
            update={"polish_iterations": steps}), show_progress=False)  # fmt: skip
        spreads[steps] = list(calls)
        assert result.uncertainty.shape == result.grid.shape
    assert spreads[0][0] is False and spreads[0][-1] is True  # stage 0's blocks, then the finest pass's
    assert not any(spreads[3]) and len(spreads[3]) == len(spreads[0])


def test_fold_free_updates_keep_a_folding_network_from_folding_the_field() -> None:
    """A stub network whose every update folds: composed as averaged, the field folds; made fold-free (the
    default), it does not, and it still moves the tissue the way the updates push it."""
    fixed, moving = blob_pair()
    config = InferenceConfig(
        device="cpu", max_rotation_deg=0.0, initial_alignment="center_of_mass", polish_iterations=0,
        stage_check=False, n_stages=2,
    )  # fmt: skip
    results = {
        free: register_arrays(FoldingUpdate(), fixed, moving, config.model_copy(update={"fold_free_updates": free}))
        for free in (False, True)
    }
    folded, unfolded = (jacobian_determinant(results[f].field, results[f].grid) for f in (False, True))
    assert folded.min() < 0 and unfolded.min() > 0
    moved = np.abs(results[True].field - results[True].field.mean(axis=(1, 2, 3), keepdims=True)).max()
    assert moved > 0.5 * float(results[True].grid.spacing.min())  # not fold-free by doing nothing


def test_register_arrays_is_seeded_and_deterministic() -> None:
    torch.manual_seed(0)
    model = PatchMorph(ModelConfig(patch_size=8, widths=(4, 4), affine_widths=(4, 4), n_stages=2))
    fixed, moving = blob_pair()
    config = InferenceConfig(batch_size=32, device="cpu", seed=5, stage_check=False)  # a random net's passes
    first = register_arrays(model, fixed, moving, config, show_progress=False)
    second = register_arrays(model, fixed, moving, config, show_progress=False)
    assert np.array_equal(first.field, second.field)
    assert np.array_equal(first.uncertainty, second.uncertainty)
    assert np.isfinite(first.field).all() and first.uncertainty.max() > 0
    reseeded = register_arrays(
        model, fixed, moving, config.model_copy(update={"seed": 6}), show_progress=False
    )
    assert not np.array_equal(first.field, reseeded.field)


def test_fixed_image_is_sampled_once_per_lattice_box_and_field_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = PatchMorph(ModelConfig(patch_size=8, widths=(4, 4), affine_widths=(4, 4), n_stages=2))
    fixed, moving = blob_pair()
    config = InferenceConfig(
        batch_size=32, device="cpu", seed=5, refine_passes=2, initial_alignment="center_of_mass", n_stages=2
    )
    plan = plan_registration(model, fixed, moving, config)
    assert [lattice.name for lattice in plan.lattices] == ["stage0", "stage1", "stage1.1", "stage1.2"]
    images = StageFixedImages(fixed, plan.fixed_range)
    made = [images.get(lattice) for lattice in plan.lattices]
    assert all(isinstance(image, Level) for image in made)
    assert made[-1] is made[-2] is made[-3] and made[0] is not made[-1]  # the finest stage's passes share it
    assert not made[-1].array.flags.writeable
    other = plan_registration(model, fixed, moving, config.model_copy(update={"refine_overlap": 3.0}))
    assert images.get(other.lattices[-1]) is not made[-1]  # another lattice box on the same grid
    assert StageFixedImages(fixed, plan.fixed_range, max_bytes=1024).get(plan.lattices[-1]) is None
    rotated = plan_registration(model, fixed, moving, config.model_copy(update={"patch_layout": "rotated"}))
    assert images.get(rotated.lattices[-1]) is None
    # a registration slices every pass's fixed patches from it; without it (over the size limit) every
    # pass samples its own box, and the field is the same to float32 rounding
    result = register_arrays(model, fixed, moving, config, show_progress=False)
    assert [s["fixed_from_grid"] for s in result.info["stages"] if s["kind"] == "network"] == [1.0] * 4
    monkeypatch.setattr(inference, "FIXED_ON_GRID_BYTES", 0)
    sampled = register_arrays(model, fixed, moving, config, show_progress=False)
    assert [s["fixed_from_grid"] for s in sampled.info["stages"] if s["kind"] == "network"] == [0.0] * 4
    np.testing.assert_allclose(sampled.field, result.field, atol=1e-4)
    assert np.abs(result.field).max() > 0.1


def test_refinement_passes_repeat_the_finest_stage_on_other_patches_from_its_field() -> None:
    fixed, moving = blob_pair()
    model = ConstantUpdate((0.0, 0.0, 0.0))
    plan = plan_registration(
        model, fixed, moving, InferenceConfig(device="cpu", refine_passes=2, refine_overlap=None)
    )
    first, *passes = plan.lattices[-3:]
    assert [lat.repeat for lat in (first, *passes)] == [0, 1, 2]
    assert all(g is plan.grids[-3] for g in plan.grids[-2:])  # same output field grid
    centres = [np.array([lat.spec(c).center for c in lat.cells()]) for lat in (first, *passes)]
    assert all(np.abs(centres[0] - other).max() > 0.0 for other in centres[1:])  # freshly drawn patches
    sparse = plan_registration(
        model, fixed, moving, InferenceConfig(device="cpu", overlap=1.5, refine_passes=1, refine_overlap=1.0)
    )
    assert sparse.lattices[-1].step == pytest.approx(1.5 * sparse.lattices[-2].step)  # overlap 1.0 vs 1.5
    # the update is applied once per pass: a constant update of v gives (passes + 1)·v over the start
    step = (0.5, -0.25, 0.75)
    fields = {
        n: register_arrays(
            ConstantUpdate(step),
            fixed,
            moving,
            InferenceConfig(
                device="cpu", refine_passes=n, refine_overlap=None, initial_alignment="center_of_mass",
                polish_iterations=0, stage_check=False, fold_free_updates=False,  # the plain arithmetic
            ),
            show_progress=False,
        )
        for n in (0, 1)
    }
    added = fields[1].field - fields[0].field
    covered = np.all(np.abs(added) > 1e-3, axis=0)  # where the refinement pass's patches put weight
    assert covered.mean() > 0.3
    assert np.allclose(np.median(added[:, covered], axis=1), step, atol=1e-3)


def test_a_pass_that_lowers_the_similarity_is_rejected_and_recorded() -> None:
    fixed, moving = blob_pair()  # the centre-of-mass start aligns them: every update of 3 mm makes it worse
    model = ConstantUpdate((3.0, -3.0, 0.0))
    config = InferenceConfig(
        batch_size=8, device="cpu", max_rotation_deg=0.0, initial_alignment="center_of_mass", overlap=2.0,
        refine_passes=0, polish_iterations=0, n_stages=2,
    )  # fmt: skip
    checked = register_arrays(model, fixed, moving, config, show_progress=False)
    initial = np.array(checked.info["initial_matrix"])[:3, 3]
    stages = checked.info["stages"]
    assert [s["accepted"] for s in stages] == [False, False]
    assert all(s["similarity_after"] < s["similarity_before"] for s in stages)
    plan = plan_registration(model, fixed, moving, config)
    start = AffineDisplacement(np.array(checked.info["initial_matrix"]))
    for stage, grid in zip(stages, plan.grids, strict=True):  # each pass starts from the start, on its own grid
        scorer = StageScorer.build(fixed, plan.moving, (plan.fixed_range, plan.moving_range), grid)
        assert stage["similarity_before"] == scorer.score(start)
    assert np.allclose(checked.field, initial[:, None, None, None], atol=1e-4)  # the start's field
    unchecked = register_arrays(
        model, fixed, moving, config.model_copy(update={"stage_check": False}), show_progress=False
    )
    assert "accepted" not in unchecked.info["stages"][0]
    assert np.abs(unchecked.field - initial[:, None, None, None]).max() > 5.0  # both updates taken


def test_a_pass_that_raises_the_similarity_is_kept() -> None:
    fixed, moving = blob_pair()
    model = ConstantUpdate((0.0, 0.0, 0.0))
    config = InferenceConfig(
        batch_size=8, device="cpu", max_rotation_deg=0.0, initial_alignment="center_of_mass", overlap=2.0,
        refine_passes=0, polish_iterations=0, n_stages=2,
    )  # fmt: skip
    stages = register_arrays(model, fixed, moving, config, show_progress=False).info["stages"]
    assert [s["accepted"] for s in stages] == [True, True]  # no change is no loss


def test_a_one_chunk_prior_is_read_once_into_memory(tmp_path) -> None:
    """The next pass's prior: a field of at most IN_MEMORY_VOXELS (stored as one chunk) comes back as its values in
    memory (every block would otherwise decode the whole chunk); a larger one stays the lazily read array."""
    import zarr

    from patchmorph_core.spatial import Grid
    from pipeline.driver import IN_MEMORY_VOXELS, prior_array

    small = Grid.from_spacing((5, 7, 6), (2.0, 1.5, 1.0))
    values = np.random.default_rng(0).standard_normal((3, *small.shape)).astype(np.float32)
    stored = zarr.create_array(str(tmp_path / "prior.zarr"), shape=values.shape, chunks=values.shape, dtype="float32")
    stored[...] = values
    in_memory = prior_array(stored, small)
    assert isinstance(in_memory, np.ndarray) and np.array_equal(in_memory, values)
    side = int(round(IN_MEMORY_VOXELS ** (1 / 3))) + 1
    large = Grid.from_spacing((side, side, side), (1.0, 1.0, 1.0))
    assert prior_array(stored, large) is stored


def test_the_polish_input_is_stored_in_chunks_nesting_in_the_output_chunks(tmp_path) -> None:
    """The finest network pass's field, which the polish reads over halos, has half the output's chunk edge; the
    pass's plan stays the output's chunks (each task writes all three arrays whole); without a polish the pass
    writes the output itself."""
    from patchmorph_core.spatial import Grid
    from pipeline.driver import ZarrStore
    from pipeline.ngff import write_block
    from pipeline.resume import RunRecords

    grid = Grid.from_spacing((70, 50, 40), (1.0, 1.0, 1.0))
    (tmp_path / "run").mkdir()
    (tmp_path / "run2").mkdir()
    store = ZarrStore(tmp_path / "field.ome.zarr", RunRecords(tmp_path / "run"), 16, {})
    arrays = store.network_pass("stage2", grid, last=True, output=False)
    assert tuple(write_block(arrays.field))[-3:] == (8, 8, 8)
    assert tuple(arrays.plan.chunk) == (16, 16, 16)
    output = ZarrStore(tmp_path / "direct.ome.zarr", RunRecords(tmp_path / "run2"), 16, {})
    assert tuple(write_block(output.network_pass("stage2", grid, last=True, output=True).field))[-3:] == (16, 16, 16)


def test_a_small_field_is_stored_as_its_two_halves_by_default(tmp_path) -> None:
    """Without a chunk size, a field of at most IN_MEMORY_VOXELS voxels (output, uncertainty, the polish's input
    and the pass's plan) is two chunks, its halves along its longest axis (here y of an anisotropic grid); a
    larger field gets the default 64³ chunks, and a chunk size given is kept."""
    from patchmorph_core.spatial import Grid
    from pipeline.driver import IN_MEMORY_VOXELS, ZarrStore
    from pipeline.ngff import write_block
    from pipeline.resume import RunRecords

    grid = Grid.from_spacing((30, 45, 20), (2.0, 0.5, 1.0))
    (tmp_path / "run").mkdir()
    store = ZarrStore(tmp_path / "field.ome.zarr", RunRecords(tmp_path / "run"), None, {})
    arrays = store.network_pass("stage2", grid, last=True, output=False)
    assert tuple(write_block(arrays.field))[-3:] == (30, 23, 20)
    assert tuple(write_block(arrays.uncertainty)) == (30, 23, 20)
    assert tuple(arrays.plan.chunk) == (30, 23, 20) and len(arrays.plan.ids()) == 2
    side = int(round(IN_MEMORY_VOXELS ** (1 / 3))) + 1
    assert store.chunk_for(Grid.from_spacing((side, side, 9), (1.0, 1.0, 1.0))) == (side // 2 + 1, side, 9)
    assert store.chunk_for(Grid.from_spacing((side, side, side), (1.0, 1.0, 1.0))) is None
    assert tuple(write_block(store.polish_pass("polish", arrays.plan).field))[-3:] == (30, 23, 20)
    given = ZarrStore(tmp_path / "given.ome.zarr", RunRecords(tmp_path / "run"), 16, {})
    assert given.chunk_for(grid) == 16


def test_a_fitted_affine_that_the_stage_check_scores_lower_is_replaced_by_the_centre_of_mass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fit passed its own test on coarse copies but is worse on the first pass's grid: the plan starts from
    the centre of mass and runs the whole-brain stage; the record keeps both scores."""
    fixed, moving = blob_pair()
    model = ConstantUpdate((0.0, 0.0, 0.0))
    config = InferenceConfig(device="cpu", n_stages=2, initial_alignment="affine")
    com = np.eye(4)
    com[:3, 3] = initial_translation(fixed, moving.with_unit(fixed.unit))
    off = com.copy()
    off[:3, 3] += (4.0, -3.0, 2.0)  # mm: a fit gone wrong

    def fit(matrix: np.ndarray) -> Callable[..., AffineFit]:
        return lambda *_: AffineFit(matrix, 0.5, 0.6, True, 0.0)

    monkeypatch.setattr(inference, "fit_affine", fit(off))
    plan = plan_registration(model, fixed, moving, config)
    assert plan.alignment["accepted"] is False and not plan.alignment["check_accepted"]
    assert plan.alignment["check_similarity_after"] < plan.alignment["check_similarity_before"]
    assert np.allclose(plan.initial, com) and [lat.name for lat in plan.lattices] == ["stage0", "stage1"]
    monkeypatch.setattr(inference, "fit_affine", fit(com))  # a fit as good as the start is kept
    kept = plan_registration(model, fixed, moving, config)
    assert kept.alignment["accepted"] is True and [lat.name for lat in kept.lattices] == ["stage1"]
    unchecked = plan_registration(model, fixed, moving, config.model_copy(update={"stage_check": False}))
    assert "check_accepted" not in unchecked.alignment
