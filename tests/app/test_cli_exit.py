"""The ``patchmorph`` entry point leaves the objects alive at its end to the process's exit, not to the
interpreter's final cyclic collection (:func:`patchmorph.cli.main`)."""

from __future__ import annotations

import gc

import pytest

from patchmorph import cli


def test_main_freezes_what_is_alive_when_the_command_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["patchmorph", "--version"])
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        with pytest.raises(SystemExit) as done:
            cli.main()
        assert done.value.code in (0, None)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
