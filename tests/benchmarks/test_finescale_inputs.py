"""The fine-scale benchmark's prepared inputs are reused only while what made them is unchanged."""

from __future__ import annotations

from pathlib import Path

import fields
import finescale
import pytest


def test_prepared_inputs_are_keyed_by_their_settings_and_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = finescale.inputs_key()
    assert key == finescale.inputs_key() and len(key) == 64
    changes = {"SEED": finescale.SEED + 1, "STRAIN": finescale.STRAIN * 2}
    for name, value in changes.items():
        with monkeypatch.context() as patch:
            patch.setattr(finescale, name, value)
            assert finescale.inputs_key() != key, name
    other = tmp_path / "fields.py"
    other.write_text("# the code that deforms the brain, changed\n")
    with monkeypatch.context() as patch:
        patch.setattr(fields, "__file__", str(other))
        assert finescale.inputs_key() != key
    assert finescale.inputs_key() == key
