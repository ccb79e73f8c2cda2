"""The ``patchmorph`` entry point leaves the objects alive at its end to the process's exit, not to the
interpreter's final cyclic collection (:func:`patchmorph.cli.main`)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

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


def _run_main(args: list[str], tmp_path) -> subprocess.CompletedProcess[str]:
    """``patchmorph.cli.main`` in a fresh interpreter that registered an atexit handler first."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('interpreter teardown ran', flush=True))\n"
        f"sys.argv = ['patchmorph', *{args!r}]\n"
        "from patchmorph.cli import main\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)


def test_a_file_command_that_succeeds_exits_at_once_with_its_output_complete(tmp_path) -> None:
    """``convert`` (a FAST_EXIT_COMMANDS command) ends without the interpreter's teardown once its output is
    written and marked complete, and so does one that refused its input (its code and sentence kept: the teardown
    could print a traceback of Zarr's event-loop thread after the sentence); other commands keep the normal exit."""
    image = tmp_path / "image.nii.gz"
    affine = np.diag([0.5, 0.25, 2.0, 1.0])
    volume = np.random.default_rng(0).random((9, 14, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), str(image))
    done = _run_main(["convert", str(image), str(tmp_path / "image.ome.zarr")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "interpreter teardown ran" not in done.stdout
    assert zarr.open_group(str(tmp_path / "image.ome.zarr"), mode="r").attrs["patchmorph"]["complete"] is True
    failed = _run_main(["convert", str(tmp_path / "missing.nii.gz"), str(tmp_path / "other.ome.zarr")], tmp_path)
    assert failed.returncode == 2 and "interpreter teardown ran" not in failed.stdout
    assert failed.stderr.strip().startswith("error: ") and "does not exist" in failed.stderr
    version = _run_main(["--version"], tmp_path)
    assert version.returncode == 0 and "interpreter teardown ran" in version.stdout


def test_the_command_runs_numpys_blas_on_one_thread_unless_the_user_set_it() -> None:
    """``main`` sets ``OPENBLAS_NUM_THREADS`` to 1 before any command imports numpy (importing the command line
    imports no numpy), and keeps a value the user set."""
    code = (
        "import os, sys\n"
        "sys.argv = ['patchmorph', '--version']\n"
        "from patchmorph import cli\n"
        "assert 'numpy' not in sys.modules\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print('threads', os.environ.get('OPENBLAS_NUM_THREADS'))\n"
    )
    for given, expected in ((None, "1"), ("3", "3")):
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        if given is not None:
            env["OPENBLAS_NUM_THREADS"] = given
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
        assert done.returncode == 0, done.stderr
        assert f"threads {expected}" in done.stdout


COMMAND_MODULES = ("atlas", "convert", "demo", "evaluate", "fields", "register", "server", "train")


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_each_command_module_imports_on_its_own(module: str) -> None:
    """A command module imported first, in a fresh interpreter (a script or notebook that uses its options), imports
    whole: it registers with :mod:`patchmorph.app`, which does not import the other command modules."""
    done = subprocess.run(
        [sys.executable, "-c", f"import patchmorph.{module}"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("error", ["CommClosedError", "KilledWorker"])
def test_a_lost_dask_worker_is_one_sentence(monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    """A worker that died (most often over its memory limit) ends the command with one sentence naming the cause
    and the remedy, exit code 1, not Dask's 'Stream is closed' or a traceback."""
    from types import SimpleNamespace

    import typer
    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError
    from typer.testing import CliRunner

    from patchmorph import app as app_module

    raised = {"CommClosedError": CommClosedError("in <TCP (closed)>: Stream is closed"),
              "KilledWorker": KilledWorker("task", SimpleNamespace(address="tcp://10.0.0.7:40123"), 3)}[error]  # fmt: skip
    monkeypatch.setattr(app_module, "app", typer.Typer())

    def fails() -> None:
        raise raised

    app_module.command(fails)
    app_module.app.command(name="other")(lambda: None)  # two commands: the name is required, as in ours
    result = CliRunner().invoke(app_module.app, ["fails"])
    assert result.exit_code == app_module.EXIT_SYSTEM
    assert "the Dask cluster lost a worker" in result.output and "raise memory_per_worker" in result.output


def test_a_full_disk_names_the_output_being_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A disk that fills mid-write, whose error carries no path (a chunk store's write), names the command's output
    and the remedy, exit code 1."""
    import errno

    import typer
    from typer.testing import CliRunner

    from patchmorph import app as app_module

    monkeypatch.setattr(app_module, "app", typer.Typer())

    def fills(out: Path = typer.Option(..., "--out")) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    app_module.command(fills)
    app_module.app.command(name="other")(lambda: None)
    result = CliRunner().invoke(app_module.app, ["fills", "--out", str(tmp_path / "field.ome.zarr")])
    assert result.exit_code == app_module.EXIT_SYSTEM
    assert f"no space left on device (while writing {tmp_path / 'field.ome.zarr'}): free space on that disk" in result.output
