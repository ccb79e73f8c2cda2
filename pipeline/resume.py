"""Completion records that make a chunked run resumable.

A run folder (``<output>.run/`` beside the output) holds one ``run.json`` (a fingerprint of the inputs,
settings and chunk plan) and, per stage, one record file per finished output chunk. Rules:

* A chunk's record is written only AFTER every array of that chunk has been written whole, by an atomic
  rename; a chunk without a record is recomputed and rewritten on the next run, so a half-written chunk
  is never taken as complete.
* A rerun with the same fingerprint skips recorded chunks; a different fingerprint is refused unless
  ``overwrite`` is set (then the run folder starts empty). The fingerprint names every input by its
  content identity (:func:`content_identity`), not only its path: records left by a run on other data
  (an image rewritten in place, a field registered again) are never reused.
* A stage's records vouch for the stores its chunks were written into (``stores.json``: their ``write_id``):
  when one of them was deleted or written anew since, the records are dropped and the stage runs again
  (:meth:`StageRecords.vouch_for`), so an output deleted beside a kept run folder is never left with chunks
  its records call done.
* Every chunk write also leaves one uniquely named entry in ``writes/``, so tests and audits can count how
  often each chunk was written (exactly once in an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import glob
import hashlib
import inspect
import io
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from patchmorph_core.errors import InputError

logger = logging.getLogger(__name__)

ChunkId = tuple[int, int, int]


ITEM_RECORD = "done.json"
"""Name of a batch item's completion record in its output folder (written last by the flows)."""

WRITE_ID = "write_id"
"""Key in ``attrs["patchmorph"]`` of a store this product wrote: a random id drawn when the store is created
(:func:`pipeline.ngff.create_image_array`), so every new write of a path has a new identity."""

WHOLE_FILE_HASH_BYTES = 256 << 20
"""Files up to this size are identified by the SHA-256 of their bytes; larger ones by size, modification
time and the hash of their first and last MiB."""

ZARR_METADATA = ("zarr.json", ".zattrs", ".zgroup", ".zarray")
"""The metadata documents of a Zarr store (v3, v2), one of which it holds at its top."""

STORES_RECORD = "stores.json"
"""File in a stage's record folder: the ``write_id`` of every store its chunk records vouch for."""


def stored_attribute(path: Path, key: str) -> Any:
    """``attrs["patchmorph"][key]`` of the Zarr v3 store at ``path``, read from its ``zarr.json`` alone (None: no
    store there, or no such key)."""
    metadata = Path(path) / "zarr.json"
    if not metadata.is_file():
        return None
    return json.loads(metadata.read_text()).get("attributes", {}).get("patchmorph", {}).get(key)


def write_identity(path: Path) -> str | None:
    """The ``write_id`` of the store this product wrote at ``path`` (None: no store there, or not ours)."""
    return stored_attribute(path, WRITE_ID)


def input_writes(inputs: Mapping[str, str | Path | None]) -> dict[str, tuple[Path, str | None]]:
    """Each input store's path and ``write_id`` by role (None: not a store this product wrote), taken when a run
    starts reading them (:func:`check_inputs_unchanged`)."""
    return {role: (Path(path), write_identity(Path(path))) for role, path in inputs.items() if path is not None}


def check_inputs_unchanged(before: Mapping[str, tuple[Path, str | None]], out: Path) -> None:
    """Refuse to mark ``out`` finished when an input store was written anew while the run read it (a ``convert
    --overwrite`` of it by another process): its chunks may come from both versions.

    Raises:
        InputError: naming the input and what to do; ``out`` stays unfinished.
    """
    for role, (path, written) in before.items():
        if written is not None and write_identity(path) != written:
            raise InputError(
                f"the {role} image {path} was written again while this run read it (another process replaced it), so "
                f"{out} may mix the two versions: it is left unfinished; rerun the command with --overwrite."
            )


def _files(root: Path) -> Iterator[os.DirEntry[str]]:
    """Every file below ``root``, in sorted order."""
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                yield from _files(Path(entry.path))
            elif entry.is_file():
                yield entry


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if stat.st_size <= WHOLE_FILE_HASH_BYTES:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            return {"bytes": stat.st_size, "sha256": digest.hexdigest()}
        digest.update(handle.read(1 << 20))
        handle.seek(-(1 << 20), os.SEEK_END)
        digest.update(handle.read())
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256_head_tail": digest.hexdigest()}


CONTENT_SAMPLES = 4
"""Blocks read from a file by :func:`sample_digest`, at evenly spaced offsets (first to last)."""

CONTENT_SAMPLE_BYTES = 4096
"""Size in bytes of each block :func:`sample_digest` reads."""


def sample_digest(path: Path) -> str:
    """SHA-256 of :data:`CONTENT_SAMPLES` blocks of :data:`CONTENT_SAMPLE_BYTES` of the file at ``path``: what its
    size and modification time miss when it was rewritten in place with its time kept (``touch -r``, ``cp -p`` or
    ``rsync -a`` of another version, a file system that keeps whole seconds), for a few reads (0.1-0.7 ms a plane
    of the bundled plane folder)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        for index in range(CONTENT_SAMPLES):
            handle.seek(max(0, size - CONTENT_SAMPLE_BYTES) * index // (CONTENT_SAMPLES - 1))
            digest.update(handle.read(CONTENT_SAMPLE_BYTES))
    return digest.hexdigest()


def _own_metadata(root: Path) -> Iterator[Path]:
    """The metadata documents of a store this product wrote: its group's and its direct children's (the levels'
    arrays, a child image such as a field's uncertainty), never those of the label images nested under its
    ``labels`` group nor of a run folder: writing labels into a brain does not change the brain, and a label
    warp killed half-way resumes against the same brain. No chunk file is listed."""
    yield from (root / name for name in ZARR_METADATA if (root / name).is_file())
    with os.scandir(root) as entries:
        children = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    for child in children:
        if child != "labels" and not child.endswith(".run"):
            yield from (root / child / name for name in ZARR_METADATA if (root / child / name).is_file())


def content_identity(path: str | Path | None) -> dict[str, Any] | None:
    """What identifies an input's content, cheaply, for resume records and flow records.

    * a store this product wrote: its ``write_id`` (new for every write) and the hash of its own metadata
      documents (:func:`_own_metadata`);
    * any other folder (a foreign Zarr store, a TIFF plane folder): the hash of its metadata documents and
      of every file's relative path, size and modification time, and in a folder that is no Zarr store (a plane
      folder) a sample of every file's bytes (:func:`sample_digest`);
    * a file: the SHA-256 of its bytes (size, modification time and head/tail hash beyond
      :data:`WHOLE_FILE_HASH_BYTES`).

    Returns None for None; a URL or a missing path is identified by its text alone.
    """
    if path is None:
        return None
    if "://" in str(path) or not Path(path).exists():
        return {"path": str(path)}
    p = Path(path).resolve()
    if p.is_file():
        return {"path": str(p), **_file_identity(p)}
    digest = hashlib.sha256()
    write_id = write_identity(p)
    if write_id is not None:
        for document in _own_metadata(p):
            digest.update(os.path.relpath(document, p).encode() + document.read_bytes())
        return {"path": str(p), "write_id": write_id, "sha256": digest.hexdigest()}
    planes = not any((p / name).is_file() for name in ZARR_METADATA)  # a Zarr store's chunks are not sampled
    for entry in _files(p):
        relative = os.path.relpath(entry.path, p)
        if entry.name in ZARR_METADATA:
            digest.update(relative.encode() + Path(entry.path).read_bytes())
        else:
            stat = entry.stat()
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            if planes:
                digest.update(sample_digest(Path(entry.path)).encode())
    return {"path": str(p), "write_id": write_id, "sha256": digest.hexdigest()}


@functools.lru_cache(maxsize=1)
def code_identity() -> str:
    """SHA-256 of the source of the packages that compute and write fields (``patchmorph_core`` and ``pipeline``),
    for resume records: a run folder left by other code is not resumed, so that no output mixes chunks of two
    versions of the method."""
    here = Path(__file__).resolve().parent  # both packages are installed side by side, as in the repository
    digest = hashlib.sha256()
    for package in (here.parent / "patchmorph_core", here):
        for source in sorted(package.rglob("*.py")):
            digest.update(f"{package.name}/{source.relative_to(package).as_posix()}\0".encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def chunk_name(cid: ChunkId) -> str:
    """File-name form of a chunk index ``(i, j, k)`` (chunk counts along ``z, y, x``)."""
    return "_".join(str(int(c)) for c in cid)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> int:
    """``write(handle)`` into a temporary file beside ``path``, renamed to ``path`` once complete (a reader sees
    the whole file or none); the bytes written."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("wb") as handle:
        write(handle)
        size = handle.tell()
    os.replace(tmp, path)
    return size


def as_recorded(value: Any) -> Any:
    """``value`` as a JSON record of it reads back (tuples as lists, other objects as their text): the form to
    compare with a stored record."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def atomic_write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV table (``header``, then ``rows``) to ``path`` through a temporary file and an atomic rename
    (:func:`atomic_write`): a table that exists is whole."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, lambda handle: handle.write(text.getvalue().encode()))
    return path


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename (:func:`atomic_write`)."""
    text = json.dumps(data, indent=1, sort_keys=True)
    atomic_write(path, lambda handle: handle.write(text.encode()))


@dataclass(frozen=True)
class StageRecords:
    """Completion records and write log of one stage's output chunks (picklable: paths only)."""

    root: Path

    @property
    def pieces(self) -> Path:
        """Folder where the stage's block tasks leave their pieces for its chunk tasks when it spills them
        (:func:`pipeline.driver.spill_folder`, :func:`pipeline.chunked.run_chunked`'s ``spill``; removed once the
        stage is done)."""
        return self.root / "pieces"

    def record_path(self, cid: ChunkId) -> Path:
        """Path of the completion record of chunk ``cid``."""
        return self.root / "done" / f"{chunk_name(cid)}.json"

    def is_done(self, cid: ChunkId) -> bool:
        """True when chunk ``cid`` has a completion record."""
        return self.record_path(cid).is_file()

    def completed(self) -> set[ChunkId]:
        """Indices of every chunk with a completion record."""
        folder = self.root / "done"
        if not folder.is_dir():
            return set()
        out: set[ChunkId] = set()
        for path in folder.glob("*.json"):
            parts = path.stem.split("_")
            out.add((int(parts[0]), int(parts[1]), int(parts[2])))
        return out

    def log_write(self, cid: ChunkId) -> None:
        """Leave one write-log entry for chunk ``cid`` (call just before writing its arrays)."""
        folder = self.root / "writes"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{chunk_name(cid)}.{uuid.uuid4().hex}").touch()

    def write_counts(self) -> dict[ChunkId, int]:
        """How many times each chunk was written, from the write log."""
        counts: dict[ChunkId, int] = {}
        folder = self.root / "writes"
        if not folder.is_dir():
            return counts
        for path in folder.iterdir():
            parts = path.name.split(".")[0].split("_")
            cid = (int(parts[0]), int(parts[1]), int(parts[2]))
            counts[cid] = counts.get(cid, 0) + 1
        return counts

    def log_block(self, start: Sequence[int], figures: dict[str, Any]) -> None:
        """Write the figures (seconds, forward seconds, ...) of the block task that starts at ``start`` to
        ``blocks/<start>.json`` (read by ``benchmarks/scale.py``; a rerun overwrites them)."""
        folder = self.root / "blocks"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{'_'.join(str(int(a)) for a in start)}.json").write_text(json.dumps(figures))

    def log_spilled(self, nbytes: int) -> None:
        """Write the bytes this run of the stage wrote to its spill folder (:attr:`pieces`) to ``spilled.json``
        (read by ``benchmarks/scale.py``; a resumed run overwrites it with its own blocks' bytes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / "spilled.json", {"bytes": int(nbytes)})

    def mark_done(self, cid: ChunkId, info: dict[str, Any]) -> None:
        """Record chunk ``cid`` as complete (call only after all its arrays are written whole)."""
        folder = self.root / "done"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record_path(cid), {"chunk": list(cid), **info})

    def vouch_for(self, stores: Sequence[Path]) -> bool:
        """Keep the completion records only while the stores they vouch for are the ones they were written
        into: every store at ``stores`` still there with the ``write_id`` recorded when the stage started
        (:meth:`bind`). Otherwise (a store deleted, or written anew since) the records are dropped and every
        chunk of the stage is computed again; False then."""
        if not self.completed():
            return True
        bound = self.root / STORES_RECORD
        recorded = json.loads(bound.read_text()) if bound.is_file() else {}
        if all(recorded.get(str(p)) is not None and recorded.get(str(p)) == write_identity(p) for p in stores):
            return True
        shutil.rmtree(self.root / "done", ignore_errors=True)
        bound.unlink(missing_ok=True)
        return False

    def bind(self, stores: Sequence[Path]) -> None:
        """Record the ``write_id`` of every store the stage writes (call once they are open, before any chunk
        is marked done; :meth:`vouch_for` checks them on the next run)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / STORES_RECORD, {str(p): write_identity(p) for p in stores})


@dataclass(frozen=True)
class RunRecords:
    """The run folder of one output: fingerprint plus per-stage records."""

    root: Path

    def stage(self, name: str) -> StageRecords:
        """Records of stage ``name`` (e.g. ``"stage0"``, ``"final"``, ``"warp"``)."""
        return StageRecords(self.root / name)

    def finish(self) -> None:
        """Mark the whole run finished (the output is complete and usable)."""
        atomic_write_json(self.root / "finished.json", {"finished": True})

    @property
    def finished(self) -> bool:
        """True when :meth:`finish` was called for this run."""
        return (self.root / "finished.json").is_file()


def run_matches(root: Path, fingerprint: dict[str, Any]) -> bool:
    """Whether ``root`` holds the records of an unfinished run described by ``fingerprint`` (one to resume)."""
    manifest = root / "run.json"
    if not manifest.is_file() or RunRecords(root).finished:
        return False
    return bool(json.loads(manifest.read_text()) == as_recorded(fingerprint))


def open_run(root: Path, fingerprint: dict[str, Any], overwrite: bool) -> RunRecords:
    """Open (or start) the run folder ``root`` for a run described by ``fingerprint``.

    Args:
        root: run folder, usually ``<output>.run``.
        fingerprint: JSON-serialisable description of inputs, settings and chunk plan; a rerun resumes
            only when it is identical.
        overwrite: discard any existing records and start again.

    Raises:
        InputError: records of a run with a different fingerprint exist and ``overwrite`` is false.
    """
    manifest = root / "run.json"
    wanted = as_recorded(fingerprint)
    if overwrite and root.exists():
        shutil.rmtree(root)
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found != wanted:
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            if "code" in changed:
                what = " (left by another version of PatchMorph)"
                hint = "pass --overwrite to start it again with this version, or finish it with the one that began it"
            else:
                what, hint = "", "rerun with the same settings to resume, or pass --overwrite to start again"
            raise InputError(f"run folder {root} belongs to a run with different {', '.join(changed)}{what}: {hint}.")
        return RunRecords(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, wanted)
    return RunRecords(root)


def _lock(fd: int, out: Path, wait: bool) -> bool:
    """Take the exclusive ``flock`` on ``fd`` for ``out``; False where the file system has no locks.

    Raises:
        InputError: another process holds it and ``wait`` is False.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        if not wait:
            raise InputError(
                f"output {out} is being written by another run ({holder}): wait for it to finish, or stop it "
                "and rerun this command to resume."
            ) from None
        logger.info("waiting for another run (%s) to finish %s", holder, out)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except OSError:  # the file system has no locks
        return False


def _still_there(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file ``fd`` has open (a holder removes it as it lets go)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def output_lock(out: Path, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive right to write ``out`` (and its run folder) while the block runs: an advisory lock
    (``flock``) on a hidden file beside it, ``.<name>.lock``, which names the holder. The operating system
    releases it when the process ends, also when it is killed, so a stopped run never blocks its resumption.
    Where the file system has no locks the block runs without one. With ``wait`` a held lock is waited for
    (a shared input that two runs would make at once: the second finds it made).

    Raises:
        InputError: another process holds it and ``wait`` is False (two runs into one output, e.g. a job
            started twice).
    """
    path = out.with_name(f".{out.name}.lock")
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError:  # no such folder (the caller's checks say so) or not writable: nothing to lock
            yield
            return
        try:
            locked = _lock(fd, out, wait)
        except BaseException:
            os.close(fd)
            raise
        if not locked or _still_there(fd, path):
            break
        os.close(fd)  # its holder removed it as it let go: lock the one there now
    try:
        if not locked:
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}, since {time.ctime()}".encode(), 0)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while it is held: a run that opens it later creates a new one
    finally:
        os.close(fd)


def locks_output(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``func`` holding :func:`output_lock` on its ``out`` argument."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with output_lock(Path(signature.bind(*args, **kwargs).arguments["out"])):
            return func(*args, **kwargs)

    return wrapper


PARTIAL = ".partial-"
"""Infix of the hidden sibling an output is written into before it is renamed into place."""


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove_stale_partials(out: Path) -> None:
    """Remove the hidden partial copies of ``out`` (:func:`temporary_sibling`) that a process of this host left when
    it was killed: a terabyte conversion killed near its end left its size hidden on the disk, and the rerun, which
    writes anew, could then find no room. A partial of a live process, of another host's or of unknown origin is
    kept."""
    host = socket.gethostname()
    for path in out.parent.glob(f".{glob.escape(out.name)}{PARTIAL}*"):
        owner = path.name[len(f".{out.name}{PARTIAL}"):].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not _process_alive(int(owner[1])):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def temporary_sibling(out: Path) -> Path:
    """The hidden sibling ``.<name>.partial-<host>-<pid>-<random>`` that ``out`` is written into before it is renamed
    into place (never taken for a finished output); the stale partial copies of ``out`` are removed first
    (:func:`remove_stale_partials`)."""
    remove_stale_partials(out)
    return out.with_name(f".{out.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def check_replaceable(out: Path) -> None:
    """An existing output that ``--overwrite`` may replace is a Zarr store (an earlier output): never a file or
    another folder, which a mistyped path would otherwise delete.

    Raises:
        InputError: ``out`` exists and is not a Zarr store.
    """
    if out.exists() and not (out.is_dir() and any((out / name).exists() for name in ZARR_METADATA)):
        kind = "a folder" if out.is_dir() else "a file"
        raise InputError(
            f"output {out} is {kind} that is not a Zarr store: --overwrite replaces only an earlier output; give "
            "another path (or remove it yourself if it is to go)."
        )


def run_folder(out: Path, overwrite: bool) -> Path:
    """The run folder ``<out>.run`` of an output, after checking that the output may be (re)written.

    An existing output is accepted only with ``overwrite`` or when it is an unfinished run to resume.

    Raises:
        InputError: the output's folder is missing, or the output exists and is finished (or not ours).
    """
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist: create it first.")
    root = out.with_name(out.name + ".run")
    if out.exists() and not overwrite and (not root.is_dir() or RunRecords(root).finished):
        raise InputError(
            f"output {out} already exists: pass --overwrite to replace it, or choose another path."
        )
    check_replaceable(out)
    return root
