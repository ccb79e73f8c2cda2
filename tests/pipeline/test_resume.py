"""Resume records: written after the chunk, atomic, fingerprinted; a killed run resumes to the same field."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from patchmorph_core.config import InferenceConfig
from patchmorph_core.errors import InputError
from pipeline import register as register_module
from pipeline.ngff import read_field
from pipeline.register import register_files
from pipeline.resume import StageRecords, open_run, output_lock


def test_records_and_write_log(tmp_path: Path) -> None:
    run = open_run(tmp_path / "out.run", {"fixed": "a", "chunk": 8}, overwrite=False)
    stage = run.stage("stage0")
    assert stage.completed() == set()
    stage.log_write((0, 1, 2))
    assert not stage.is_done((0, 1, 2))  # written but not recorded: a half-written chunk
    stage.mark_done((0, 1, 2), {"seconds": 0.1})
    stage.log_write((1, 0, 0))
    stage.log_write((1, 0, 0))
    assert stage.completed() == {(0, 1, 2)}
    assert stage.write_counts() == {(0, 1, 2): 1, (1, 0, 0): 2}
    assert not list((tmp_path / "out.run" / "stage0" / "done").glob(".*tmp"))  # no temporary left


def test_rerun_same_fingerprint_resumes_other_refused(tmp_path: Path) -> None:
    root = tmp_path / "out.run"
    open_run(root, {"fixed": "a", "chunk": 8}, overwrite=False).stage("s").mark_done((0, 0, 0), {})
    again = open_run(root, {"chunk": 8, "fixed": "a"}, overwrite=False)
    assert again.stage("s").completed() == {(0, 0, 0)}
    with pytest.raises(InputError, match="chunk"):
        open_run(root, {"fixed": "a", "chunk": 16}, overwrite=False)
    fresh = open_run(root, {"fixed": "a", "chunk": 16}, overwrite=True)
    assert fresh.stage("s").completed() == set()
    assert not fresh.finished
    fresh.finish()
    assert fresh.finished


def _field(path: Path) -> np.ndarray:
    return np.asarray(read_field(path)[0][:])


def test_killed_run_resumes_to_identical_field(
    tmp_path: Path, dask_scheduler: str, pair_and_config: tuple[Path, Path, InferenceConfig]
) -> None:
    """Kill a real `patchmorph register` process mid-run (SIGKILL), rerun, get the uninterrupted field."""
    fixed, moving, config = pair_and_config
    config = config.model_copy(update={"refine_passes": 1})  # killed in the refinement pass, after a whole pass
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    reference = register_files(
        fixed,
        moving,
        tmp_path / "reference.zarr",
        config,
        chunk_size=5,
        scheduler=dask_scheduler,
        progress=False,
        keep_run=True,
    )
    final = "stage1.1"  # the finest stage's refinement pass writes the output field
    network = [s for s in reference.stages if s["kind"] == "network"]
    assert [f"stage{s['stage']}.{s['repeat']}" for s in network] == ["stage1.0", final]
    counts = StageRecords(reference.run / final).write_counts()
    assert len(counts) == reference.chunks > 20 and set(counts.values()) == {1}  # no chunk written twice

    out = tmp_path / "killed.zarr"
    command = [
        str(Path(sys.executable).parent / "patchmorph"), "register", "--fixed", str(fixed), "--moving", str(moving),
        "--out", str(out), "--config", str(config_path), "--chunk-size", "5", "--workers", "1",
    ]  # fmt: skip
    from killed_helpers import same_code_env

    process = subprocess.Popen(  # this test's code, which the rerun below resumes with
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=same_code_env()
    )
    done = out.with_name(out.name + ".run") / final / "done"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(done.glob("*.json"))) < 3:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    # a second run into the same output while the first writes it is refused, naming the first
    with pytest.raises(InputError, match=rf"is being written by another run \(process {process.pid} on "):
        register_files(fixed, moving, out, config, chunk_size=5, scheduler=dask_scheduler, progress=False)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI, its scheduler and its worker processes
    process.wait()
    finished_before = len(list(done.glob("*.json")))
    assert 3 <= finished_before < reference.chunks

    resumed = register_files(
        fixed, moving, out, config, chunk_size=5, scheduler=dask_scheduler, progress=False
    )
    assert next(s for s in resumed.stages if s["name"] == final)["skipped"] >= finished_before
    assert np.array_equal(_field(out), _field(reference.field))


def test_one_output_is_written_by_one_run_at_a_time(tmp_path: Path) -> None:
    """The lock beside an output: a second holder (another run, in this process or another) is refused; it is
    gone once released, and a lock file left by a killed run does not block."""
    out = tmp_path / "field.zarr"
    with output_lock(out):
        assert "process" in (tmp_path / ".field.zarr.lock").read_text()
        with pytest.raises(InputError, match="field.zarr is being written by another run"), output_lock(out):
            pass
    assert not (tmp_path / ".field.zarr.lock").exists()
    (tmp_path / ".field.zarr.lock").write_text("process 1 on a node that died")
    with output_lock(out):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_shared_input_is_waited_for_not_made_twice(tmp_path: Path) -> None:
    """``wait=True`` (a shared input two runs would make at once): the second holder waits until the first lets
    go, then holds a lock of its own that a third run respects (the first removed the file it locked)."""
    import threading

    out, order = tmp_path / "atlas.ome.zarr", []
    first_holds, second_done = threading.Event(), threading.Event()

    def second() -> None:
        first_holds.wait()
        with output_lock(out, wait=True):
            order.append("second")
            with pytest.raises(InputError, match="being written by another run"), output_lock(out):
                pass
        second_done.set()

    waiting = threading.Thread(target=second)
    waiting.start()
    with output_lock(out):
        first_holds.set()
        time.sleep(0.5)
        order.append("first")
    assert second_done.wait(10) and order == ["first", "second"]
    waiting.join()
    assert list(tmp_path.iterdir()) == []


def _break_output_chunk(run: Path, stage: str, out: Path, victim: tuple[int, int, int]) -> StageRecords:
    """The state a crash while ``stage`` wrote the 9³ output chunk ``victim`` could leave: its record gone,
    its data NaN, the run and the output unfinished. Returns the stage's records."""
    records = StageRecords(run / stage)
    records.record_path(victim).unlink()
    (run / "finished.json").unlink()
    array = zarr.open_group(str(out), mode="r+")["0"]
    array[(slice(None), *(slice(9 * i, 9 * i + 9) for i in victim))] = np.nan
    group = zarr.open_group(str(out), mode="r+")
    group.attrs["patchmorph"] = {**dict(group.attrs["patchmorph"]), "complete": False}
    return records


def test_half_written_chunk_is_rewritten(
    tmp_path: Path, dask_scheduler: str, pair_and_config: tuple[Path, Path, InferenceConfig]
) -> None:
    """A chunk whose data was (partly) written but whose record is missing is recomputed; others are not."""
    fixed, moving, config = pair_and_config
    # both stages, no refinement pass and no polish, so the final stage (the output) follows one finished
    # coarse chunk
    config = config.model_copy(update={"first_stage": 0, "refine_passes": 0, "polish_iterations": 0})
    out = tmp_path / "field.zarr"
    first = register_files(fixed, moving, out, config, chunk_size=9, scheduler=dask_scheduler, progress=False, keep_run=True)
    expected = _field(out)
    victim = (1, 1, 0)
    records = _break_output_chunk(first.run, "stage1", out, victim)

    again = register_files(fixed, moving, out, config, chunk_size=9, scheduler=dask_scheduler, progress=False, keep_run=True)
    assert again.skipped == first.chunks - 1 + 1  # every final chunk but one, plus the coarse stage's chunk
    counts = records.write_counts()
    assert counts[victim] == 2 and all(n == 1 for cid, n in counts.items() if cid != victim)
    assert np.array_equal(_field(out), expected)


def test_a_run_left_by_other_code_is_not_resumed(
    tmp_path: Path, pair_and_config: tuple[Path, Path, InferenceConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unfinished run's records vouch only for the code that wrote them: after an upgrade the rerun is refused
    with one sentence (no output mixes chunks of two versions of the method); --overwrite starts again."""
    fixed, moving, config = pair_and_config
    config = config.model_copy(update={"first_stage": 0, "refine_passes": 0, "polish_iterations": 0})
    out = tmp_path / "field.zarr"
    first = register_files(fixed, moving, out, config, chunk_size=9, progress=False, keep_run=True)
    _break_output_chunk(first.run, "stage1", out, (1, 1, 0))
    monkeypatch.setattr(register_module, "code_identity", lambda: "another version")
    with pytest.raises(InputError, match=r"different code \(left by another version of PatchMorph\)"):
        register_files(fixed, moving, out, config, chunk_size=9, progress=False)
    again = register_files(fixed, moving, out, config, chunk_size=9, progress=False, overwrite=True)
    assert again.skipped == 0


def test_half_written_polish_chunk_is_rewritten(
    tmp_path: Path, dask_scheduler: str, pair_and_config: tuple[Path, Path, InferenceConfig]
) -> None:
    """The polish writes the output: a chunk of it without a record is polished again from the stored network
    field, and only that chunk."""
    fixed, moving, config = pair_and_config
    config = config.model_copy(update={"polish_iterations": 3})
    out = tmp_path / "field.zarr"
    first = register_files(fixed, moving, out, config, chunk_size=9, scheduler=dask_scheduler, progress=False, keep_run=True)
    assert first.polish is not None and first.polish["steps"] == 3
    expected = _field(out)
    victim = (1, 0, 1)
    records = _break_output_chunk(first.run, "polish", out, victim)

    again = register_files(fixed, moving, out, config, chunk_size=9, scheduler=dask_scheduler, progress=False, keep_run=True)
    assert again.polish is not None and again.polish["skipped"] == first.chunks - 1
    counts = records.write_counts()
    assert counts[victim] == 2 and all(n == 1 for cid, n in counts.items() if cid != victim)
    assert np.array_equal(_field(out), expected)


def test_records_of_a_deleted_output_are_not_trusted(
    tmp_path: Path, pair_and_config: tuple[Path, Path, InferenceConfig]
) -> None:
    """An unfinished run whose output was deleted (its run folder kept) computes the passes that wrote into
    the output again, instead of skipping them on their records and leaving empty chunks behind; the coarse
    pass, whose store is intact, is still skipped, and the field is the uninterrupted run's."""
    fixed, moving, config = pair_and_config
    config = config.model_copy(update={"first_stage": 0, "refine_passes": 0, "polish_iterations": 3})
    out = tmp_path / "field.zarr"
    first = register_files(fixed, moving, out, config, chunk_size=9, progress=False, keep_run=True)
    expected = _field(out)
    (first.run / "finished.json").unlink()  # the state of a run that died after the polish
    shutil.rmtree(out)

    again = register_files(fixed, moving, out, config, chunk_size=9, progress=False, keep_run=True)
    assert again.polish is not None and again.polish["skipped"] == 0
    assert StageRecords(first.run / "polish").write_counts() == {c: 2 for c in StageRecords(first.run / "polish").completed()}
    assert again.skipped >= 1  # the coarse pass's chunk, whose store was not touched
    np.testing.assert_allclose(_field(out), expected, atol=1e-6)


def test_a_write_removes_the_partial_copies_that_killed_processes_of_this_host_left(tmp_path: Path) -> None:
    """Only partial copies whose process is gone: a live process's, another host's and one of unknown origin stay."""
    import socket

    from patchmorph_core.spatial import Grid
    from pipeline.ngff import write_image

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    left = {
        "killed": tmp_path / f".brain.ome.zarr.partial-{host}-{ended.pid}-0a1b2c3d",
        "live": tmp_path / f".brain.ome.zarr.partial-{host}-{os.getpid()}-0a1b2c3d",
        "other host": tmp_path / f".brain.ome.zarr.partial-node17-{ended.pid}-0a1b2c3d",
        "unknown": tmp_path / ".brain.ome.zarr.partial-0a1b2c3d",
        "another output": tmp_path / f".other.ome.zarr.partial-{host}-{ended.pid}-0a1b2c3d",
    }
    for path in left.values():
        (path / "0").mkdir(parents=True)
    grid = Grid.from_orientation((3, 4, 5), (50.0, 20.0, 10.0), "psl")
    write_image(tmp_path / "brain.ome.zarr", np.ones(grid.shape, np.uint16), grid)
    assert {k for k, p in left.items() if p.exists()} == {"live", "other host", "unknown", "another output"}
    assert len(list(tmp_path.glob(".brain.ome.zarr.partial-*"))) == 3


def test_an_interrupted_output_with_a_run_folder_says_to_rerun_its_command(tmp_path: Path) -> None:
    """Reading an output whose write was killed: with its run folder beside it the sentence says to rerun the
    command that wrote it (it resumes), not to write it again (which users read as --overwrite, losing the run)."""
    from patchmorph_core.spatial import Grid
    from pipeline.ngff import create_image_array, read_image

    out = tmp_path / "field.zarr"
    create_image_array(out, (4, 5, 6), Grid.from_spacing((4, 5, 6), (1, 1, 1)), np.float32)
    with pytest.raises(InputError, match="incomplete output .*: write it again"):
        read_image(out)
    (tmp_path / "field.zarr.run").mkdir()
    with pytest.raises(InputError, match=r"rerun the command that wrote it, which resumes from its run folder .*field.zarr.run"):
        read_image(out)


def test_a_replacement_removes_the_older_copies_a_killed_replacement_left(tmp_path: Path) -> None:
    """A replacement killed between hiding the older output and removing it left a full-size hidden copy
    (``.<name>.old-*``); the next write of that output removes it, and no other output's."""
    from patchmorph_core.spatial import Grid
    from pipeline.ngff import read_image, write_image

    grid = Grid.from_orientation((3, 4, 5), (50.0, 20.0, 10.0), "psl")
    left = [tmp_path / ".brain.ome.zarr.old-0a1b2c3d", tmp_path / ".other.ome.zarr.old-0a1b2c3d"]
    for path in left:
        (path / "0").mkdir(parents=True)
    write_image(tmp_path / "brain.ome.zarr", np.ones(grid.shape, np.uint16), grid)
    write_image(tmp_path / "brain.ome.zarr", np.full(grid.shape, 2, np.uint16), grid, overwrite=True)
    assert [p.exists() for p in left] == [False, True]
    assert int(np.asarray(read_image(tmp_path / "brain.ome.zarr").levels[0].array[...]).max()) == 2


def test_an_output_given_as_a_symbolic_link_is_replaced_as_a_link(tmp_path: Path) -> None:
    """``--overwrite`` of an output that is a symbolic link to another store: the new output takes the link's
    place, the store it pointed to is kept as it was, and nothing is left hidden (the link, hidden as an older
    copy, made this write and every later one fail with a traceback sentence after the output was written)."""
    from patchmorph_core.spatial import Grid
    from pipeline.ngff import read_image, write_image

    grid = Grid.from_orientation((3, 4, 5), (50.0, 20.0, 10.0), "psl")
    kept = write_image(tmp_path / "kept.ome.zarr", np.ones(grid.shape, np.uint16), grid)
    link = tmp_path / "link.ome.zarr"
    link.symlink_to(kept.name)
    for value in (2, 3):  # the second write replaces the first one's real folder
        write_image(link, np.full(grid.shape, value, np.uint16), grid, overwrite=True)
        assert not link.is_symlink()
        assert int(np.asarray(read_image(link).levels[0].array[...]).max()) == value
    assert int(np.asarray(read_image(kept).levels[0].array[...]).max()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.ome.zarr", "link.ome.zarr"]


def test_an_input_replaced_while_it_is_read_leaves_the_output_unfinished(
    tmp_path: Path, pair_and_config: tuple[Path, Path, InferenceConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's ``convert --overwrite`` of the moving image while a registration reads it (here: written
    anew, with other values, just before the field's quality block): one sentence naming the image, and the field
    is not marked finished (its chunks may come from both versions)."""
    import shutil

    from pipeline import register
    from pipeline.ngff import read_image, write_image

    fixed, moving_source, config = pair_and_config
    moving = tmp_path / "moving.ome.zarr"
    shutil.copytree(moving_source, moving)
    image = read_image(moving)
    values = np.asarray(image.levels[0].array[...])
    assess = register.assess_field

    def replaced_then_assessed(*args: object, **kwargs: object) -> object:
        write_image(moving, values[::-1].copy(), image.grid, overwrite=True)  # as convert --overwrite writes it
        return assess(*args, **kwargs)

    monkeypatch.setattr(register, "assess_field", replaced_then_assessed)
    out = tmp_path / "field.ome.zarr"
    with pytest.raises(InputError, match=r"the moving image .*moving\.ome\.zarr was written again while this run read it"):
        register_files(fixed, moving, out, config, progress=False)
    with pytest.raises(InputError, match="incomplete output"):
        read_field(out)


def test_content_identity_sees_what_changes_an_input_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's fingerprint names its inputs by content_identity: a big file changed in its last MiB (same size and
    modification time) or a plane of a foreign folder rewritten at the same size is another input; label images
    written into a brain store are not (a label warp resumes against the same brain)."""
    from patchmorph_core.spatial import Grid
    from pipeline import resume
    from pipeline.ngff import write_image

    monkeypatch.setattr(resume, "WHOLE_FILE_HASH_BYTES", 2 << 20)
    big = tmp_path / "weights.pt"
    big.write_bytes(bytes(3 << 20))
    before = resume.content_identity(big)
    stat = big.stat()
    with big.open("r+b") as handle:
        handle.seek(-100, os.SEEK_END)
        handle.write(b"\x01")
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert resume.content_identity(big) != before

    planes = tmp_path / "planes"
    planes.mkdir()
    (planes / "z000.tif").write_bytes(b"a" * 64)
    before = resume.content_identity(planes)
    (planes / "z000.tif").write_bytes(b"b" * 64)
    os.utime(planes / "z000.tif", ns=(1, 10**18))
    assert resume.content_identity(planes) != before
    before, stat = resume.content_identity(planes), (planes / "z000.tif").stat()
    (planes / "z000.tif").write_bytes(b"c" * 64)  # rewritten with its size and time kept (cp -p, rsync -a)
    os.utime(planes / "z000.tif", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert resume.content_identity(planes) != before

    brain = write_image(tmp_path / "brain.zarr", np.zeros((4, 5, 6), np.uint8), Grid.from_spacing((4, 5, 6), (3.0, 2.0, 1.0)))
    before = resume.content_identity(brain)
    (brain / "labels").mkdir(exist_ok=True)
    (brain / "labels" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"x": 1}}')
    assert resume.content_identity(brain) == before
