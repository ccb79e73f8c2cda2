"""The benchmarks' prepared inputs are reused only while what made them is unchanged."""

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


def test_a_folder_is_prepared_only_under_its_key_with_every_file(tmp_path: Path) -> None:
    import harness

    files = [tmp_path / "a.nii.gz", tmp_path / "b.npy"]
    for path in files:
        path.write_bytes(b"x")
    assert not harness.prepared(tmp_path, "k1", files)  # never marked
    harness.mark_prepared(tmp_path, "k1")
    assert harness.prepared(tmp_path, "k1", files)
    assert not harness.prepared(tmp_path, "k2", files)  # made under another key
    harness.mark_prepared(tmp_path, "k1")
    files[1].unlink()
    assert not harness.prepared(tmp_path, "k1", files)  # a file is missing
    files[1].write_bytes(b"half")  # made again, then interrupted before the key: not taken for prepared
    assert not harness.prepared(tmp_path, "k1", files)


def test_the_human_and_mouse_inputs_are_keyed_by_their_synthesis(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import accuracy
    import contrasts
    import validate

    from patchmorph_core import synth

    keys = (accuracy.inputs_key(), contrasts.inputs_key(1), validate.inputs_key(1))
    with monkeypatch.context() as patch:
        patch.setattr(accuracy, "SYNTH", {**accuracy.SYNTH, "noise_std": 0.05})
        assert accuracy.inputs_key() != keys[0]
    other = tmp_path / "synth.py"
    other.write_text("# the synthesis, changed\n")
    with monkeypatch.context() as patch:  # the synthesis code counts in every benchmark's key
        patch.setattr(synth, "__file__", str(other))
        assert accuracy.inputs_key() != keys[0]
        assert contrasts.inputs_key(1) != keys[1] and validate.inputs_key(1) != keys[2]
    assert contrasts.inputs_key(2) != keys[1] and validate.inputs_key(2) != keys[2]
    assert (accuracy.inputs_key(), contrasts.inputs_key(1), validate.inputs_key(1)) == keys
