"""The train flow end to end: a few real optimizer steps on the Allen template, a checkpoint, an artifact."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.train import train
from patchmorph_core.model import load_model

DATA = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.usefixtures("prefect_server")
def test_train_flow_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    template = DATA / "mouse_ccf" / "average_template_100.nrrd"
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"kind": "atlas", "atlas": str(template), "images": [str(template)], "spacing": 0.4,
                         "unit": "millimeter"},
                "model": {"patch_size": 16, "n_stages": 2, "widths": [4, 8], "affine_widths": [4, 8]},
                "steps": 3,
                "batch_size": 1,
                "device": "cpu",
                "threads": 1,
                "checkpoint": str(tmp_path / "model.pt"),
                "checkpoint_every": 3,
            }
        )
    )

    summary = train(str(config), steps=2)

    assert summary.steps == 2 and summary.checkpoint == tmp_path / "model.pt"
    assert summary.loss_csv.is_file() and len(summary.loss_csv.read_text().splitlines()) >= 3
    assert load_model(summary.checkpoint).config.patch_size == 16

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_latest_artifacts()}
    assert "train-summary" in keys
