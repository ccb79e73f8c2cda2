"""QC figures and metrics on small anisotropic OME-Zarr volumes written by the real writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from patchmorph_core.spatial import Grid
from pipeline import qc
from pipeline.ngff import write_field, write_image


def _blob_volume(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth ellipsoid image and its three-label map (0 background, 1 outer shell, 2 core)."""
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(zz**2 + (yy / 0.8) ** 2 + (xx / 0.9) ** 2)
    image = np.clip(1.2 - r, 0, None).astype(np.float32)
    labels = np.where(r < 0.4, 2, np.where(r < 0.8, 1, 0)).astype(np.uint16)
    return image, labels


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qc")
    grid = Grid.from_orientation((20, 26, 30), (50.0, 40.0, 40.0), "psl")
    image, labels = _blob_volume(grid.shape)
    field_grid = grid.resampled(120.0)
    field = np.zeros((3, *field_grid.shape), dtype=np.float32)
    field[0] = 30.0 * np.sin(np.linspace(0, np.pi, field_grid.shape[2]))[None, None, :]
    uncertainty = np.linspace(0, 5, int(np.prod(field_grid.shape)), dtype=np.float32).reshape(field_grid.shape)
    return {
        "fixed": write_image(root / "fixed.ome.zarr", image, grid),
        "warped": write_image(root / "warped.ome.zarr", image, grid),
        "labels": write_image(root / "labels.ome.zarr", labels, grid, labels=True),
        "field": write_field(
            root / "field.ome.zarr", field, field_grid, metadata={"fixed": "f", "moving": "m"}, uncertainty=uncertainty
        ),
        "root": root,
    }


def test_qc_files_writes_four_readable_pngs(outputs: dict[str, Path]) -> None:
    record = qc.qc_files(
        outputs["fixed"], outputs["warped"], outputs["field"], outputs["root"] / "qc", warped_labels=outputs["labels"]
    )
    assert set(record.figures) == {"overlay", "checkerboard", "jacobian", "uncertainty"}
    for path in record.figures.values():
        pixels = mpimg.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 300
        assert pixels[..., :3].std() > 0.01  # not a blank canvas


def test_metrics_of_identical_images_and_labels(outputs: dict[str, Path]) -> None:
    metrics = qc.registration_metrics(
        outputs["fixed"],
        outputs["warped"],
        outputs["field"],
        fixed_labels=outputs["labels"],
        warped_labels=outputs["labels"],
    )
    assert metrics["ncc"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["dice_mean"] == pytest.approx(1.0)
    assert metrics["n_labels"] == 2
    assert metrics["folding_percent"] == 0.0
    # u_z = 30 sin(pi x / Lx): det J = 1 + du_z/dz = 1 everywhere (u_z varies along x only).
    assert metrics["jacobian_min"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["jacobian_max"] == pytest.approx(1.0, abs=1e-5)


def test_checkerboard_alternates_the_two_images() -> None:
    fixed = np.zeros((4, 4, 4), dtype=np.float32)
    warped = np.ones((4, 4, 4), dtype=np.float32)
    fixed[0, 0, 0] = 1.0  # gives the fixed image a display range: normalised values 0 (and 1 at one voxel)
    warped[0, 0, 0] = 0.0
    board = qc.checkerboard(fixed, warped, squares=2)
    assert board[0, 0, 1] == 0.0 and board[0, 0, 3] == 1.0  # cell (0,0,0) fixed, cell (0,0,1) warped
    assert board[2, 0, 0] == 1.0 and board[2, 2, 0] == 0.0


def test_preview_field_bounds_size_and_keeps_world_extent() -> None:
    grid = Grid.from_spacing((50, 20, 9), (10.0, 20.0, 30.0), unit="micrometer")
    field = np.ones((3, *grid.shape), dtype=np.float32)
    small, small_grid = qc.preview_field(field, grid, max_size=16)
    assert max(small.shape[1:]) <= 16 and small.shape[0] == 3
    np.testing.assert_allclose(small, 1.0)
    np.testing.assert_allclose(small_grid.spacing, [40.0, 40.0, 30.0])


def test_compact_labels_keeps_background_and_dice() -> None:
    a = np.array([[0, 614454277, 614454277], [5, 5, 0]], dtype=np.uint32)
    b = np.array([[0, 614454277, 5], [5, 5, 614454277]], dtype=np.uint32)
    ca, cb = qc.compact_labels(a, b)
    assert ca.max() == 2 and ca[0, 0] == 0 and cb[0, 0] == 0
    np.testing.assert_array_equal(ca == ca[0, 1], a == 614454277)
    np.testing.assert_array_equal(cb == ca[1, 0], b == 5)
    only_fg = qc.compact_labels(np.array([3, 4]), np.array([4, 4]))
    assert only_fg[0].min() == 1  # no background present: ids start at 1, 0 stays unused


def test_figures_lay_out_a_brain_by_its_anatomy_not_its_files_axes(tmp_path: Path) -> None:
    """One anisotropic, non-cubic brain stored as 'psl' and, axes permuted and flipped, as 'ira' gives the same
    figure pixel for pixel: horizontal, coronal and sagittal panels, each the usual way up."""
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in (21, 27, 31)], indexing="ij")
    image = (np.clip(1.2 - np.sqrt(zz**2 + (yy / 0.8) ** 2 + (xx / 0.9) ** 2), 0, None) + 0.3 * (xx > 0.5)).astype(np.float32)
    labels = (image > 0.6).astype(np.uint16) + (zz > 0.3)
    spacing = np.array([50.0, 40.0, 30.0])
    # written out by hand: 'ira' axis 0 is 'psl' axis 1 (s) reversed, axis 1 is axis 2 (l) reversed, axis 2 is axis 0 (p)
    # reversed
    def copy(a: np.ndarray) -> np.ndarray:
        return np.flip(np.transpose(a, (1, 2, 0)), axis=(0, 1, 2))

    first = qc.overlay_figure(image, spacing, tmp_path / "psl.png", labels, orientation="psl")
    second = qc.overlay_figure(copy(image), spacing[[1, 2, 0]], tmp_path / "ira.png", copy(labels), orientation="ira")
    np.testing.assert_array_equal(mpimg.imread(first), mpimg.imread(second))
    titles = [view.title for view in qc.plane_views(qc.DISPLAY_ORIENTATION, axis_names=False)]
    assert titles == ["horizontal", "coronal", "sagittal"]
    edges = [view.edges for view in qc.plane_views(qc.DISPLAY_ORIENTATION)]
    assert edges == [("A", "P", "L", "R"), ("S", "I", "L", "R"), ("S", "I", "A", "P")]


def test_the_preview_labels_a_strided_plane_with_the_images_index_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planes read every 2nd voxel of a (9, 40, 60) image: the axes say 0 → 59 and 0 → 39, not the planes' 0 → 29."""
    import matplotlib.axes

    said: list[str] = []
    original = matplotlib.axes.Axes.set_xlabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda ax, text, **kw: said.append(text) or original(ax, text, **kw))
    volume = np.random.default_rng(0).random((9, 40, 60)).astype(np.float32)
    planes = [volume[4, ::2, ::2], volume[::2, 20, ::2], volume[::2, ::2, 30]]
    qc.orientation_preview(planes, (2.0, 2.0, 2.0), tmp_path / "p.png", "psl", "image", shape=volume.shape)
    assert said[:3] == ["x index 0 → 59 (left → right)", "x index 0 → 59 (left → right)", "y index 0 → 39 (left → right)"]


def test_tissue_centre_is_the_middle_of_the_labelled_box() -> None:
    labels = np.zeros((9, 10, 20), np.uint8)
    labels[2:7, 1:4, 0:9] = 3  # a left half: its sagittal slice is at x = 4, not at the grid's middle (10)
    assert qc.tissue_centre(labels) == [4, 2, 4] and qc.tissue_centre(np.zeros((3, 3, 3))) is None


def test_figures_leave_the_callers_matplotlib_backend_alone(tmp_path: Path) -> None:
    """A notebook that imports the QC module and draws a figure keeps its own (interactive) backend and has no
    figure of ours left open in pyplot."""
    script = (
        "import matplotlib, numpy as np\n"
        "from pathlib import Path\n"
        "import matplotlib.pyplot as plt\n"
        "from pipeline import qc\n"
        f"qc.jacobian_figure(np.full((6, 7, 8), 1.0), (1.0, 2.0, 3.0), Path({str(tmp_path / 'j.png')!r}))\n"
        "print(matplotlib.get_backend(), len(plt.get_fignums()))\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["svg", "0"] and (tmp_path / "j.png").is_file()
