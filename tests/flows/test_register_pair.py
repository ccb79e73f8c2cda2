"""register-pair end to end: real TIFF and NRRD inputs converted, registered, warped, checked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from flows.register_pair import register_pair

DATA = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.usefixtures("prefect_server")
def test_pair_from_tiff_and_nrrd(flow_data: dict[str, Path], write_options: Callable[..., Path], tmp_path: Path) -> None:
    options = write_options(
        tmp_path / "options.yaml",
        workers=1,
        fixed_geometry={"voxel_size": [200, 200, 200], "unit": "micrometer", "orientation": "psl"},
        moving_geometry={"orientation": "rsa"},  # the Allen NRRD read in C order (see examples/PROVENANCE.md)
        moving_labels=str(DATA / "mouse_ccf" / "annotation_100um_2017_nearest_from25um.nrrd"),
    )
    out = tmp_path / "pair"

    report = register_pair(
        str(flow_data["brain_tif"]), str(DATA / "mouse_ccf" / "average_template_100.nrrd"), str(out), config=str(options)
    )

    assert report.errors == [] and [r.status for r in report.results] == ["done"]
    result = report.results[0]
    for name in ("fixed", "moving", "moving_labels", "field", "warped", "warped_labels"):
        assert (out / f"{name}.ome.zarr").is_dir(), name
    assert result.outputs["fixed"] == out / "fixed.ome.zarr"
    assert set(result.qc) == {"overlay", "checkerboard", "jacobian", "uncertainty"}
    assert {"ncc", "folding_percent", "jacobian_min", "jacobian_max"} <= set(result.metrics)
    assert (out / "report.md").is_file() and (out / "done.json").is_file()


@pytest.mark.usefixtures("prefect_server")
def test_failed_pair_fails_the_run_naming_the_step(
    flow_data: dict[str, Path], write_options: Callable[..., Path], tmp_path: Path
) -> None:
    options = write_options(tmp_path / "options.yaml", workers=1)
    state = register_pair(
        str(flow_data["atlas"]), str(tmp_path / "missing.nii.gz"), str(tmp_path / "pair"), config=str(options),
        return_state=True,
    )
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "at inputs" in message and "missing.nii.gz" in message and state.message == message
    assert (tmp_path / "pair" / "report.json").is_file()
