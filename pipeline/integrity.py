"""Chunk integrity of the Zarr v3 arrays this product writes and reads: checksums and no silent gaps.

Writing (:data:`ARRAY_OPTIONS`, used by every ``create_array`` in :mod:`pipeline.ngff`): each chunk ends
with a CRC-32C checksum (the Zarr v3 ``crc32c`` codec after the compressor; sharded arrays: every inner chunk
and the shard index), and every chunk is written, even one that holds only the fill value
(``write_empty_chunks``). A store written this way says so in its metadata
(``attrs["patchmorph"]["every_chunk_written"]``).

Reading (:class:`VerifiedStore`, wrapped around every local store :func:`pipeline.ngff.read_image` and
:func:`~pipeline.ngff.read_field` open): every chunk read is checked against its checksum before Zarr
decodes it, and when the store says every chunk was written, a missing chunk (or an inner chunk that a
shard's index marks empty) is an error too. Zarr itself would return the fill value for a missing chunk,
so a lost file would read as zeros. The error, :class:`ChunkError`, names the store, the array and the
chunk's index, and is an :class:`~patchmorph_core.errors.InputError`: one sentence, exit code 2.

Stores written by other tools may legitimately omit chunks that hold only the fill value (zarr-python's
default), so a missing chunk is an error only in stores marked as above; their checksums, when they carry
the ``crc32c`` codec, are checked all the same.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from zarr.abc.store import ByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore, WrapperStore

from patchmorph_core.errors import InputError

WRITE_CONFIG: dict[str, Any] = {"write_empty_chunks": True}
"""Zarr's runtime array configuration for writing: every chunk is stored, even one of fill values. It is not
kept in the array's metadata, so an array reopened to go on writing needs it again (:func:`writable`)."""

COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
"""Blosc's zstd at level 1 over byte-shuffled values: on noisy uint16 images several times faster to write than
plain zstd at its default level, and smaller (the shuffle groups the bytes of equal significance); see
``docs/warp.md``."""

ARRAY_OPTIONS: dict[str, Any] = {"compressors": (COMPRESSOR, Crc32cCodec()), "config": WRITE_CONFIG}
"""Keyword arguments of ``zarr.Group.create_array`` for every array the product writes."""

EVERY_CHUNK_WRITTEN = "every_chunk_written"
"""Key in ``attrs["patchmorph"]`` of a store whose every chunk was written (a missing one was lost)."""

_EMPTY = 2**64 - 1
"""Offset and length of an inner chunk that a shard's index marks as not stored."""

_METADATA_SUFFIXES = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


class ChunkError(InputError):
    """A chunk of an array is corrupt, truncated or missing; the message names the store and the chunk."""


@dataclass(frozen=True)
class ArrayLayout:
    """How one array's chunks are encoded (read from its ``zarr.json``).

    Attributes:
        crc: chunks (inner chunks of a sharded array) end with a CRC-32C checksum.
        shard_chunks: inner chunks per shard along each axis, or None when the array is not sharded.
        index_crc: the shard index ends with a CRC-32C checksum.
        index_at_start: the shard index precedes the inner chunks.
        shape: the array's shape; ``inner_chunk``: the inner chunk shape of a sharded array (a shard at the
            array's edge stores no inner chunk that lies wholly outside the array).
    """

    crc: bool
    shard_chunks: tuple[int, ...] | None = None
    index_crc: bool = False
    index_at_start: bool = False
    shape: tuple[int, ...] = ()
    inner_chunk: tuple[int, ...] = ()

    @property
    def index_bytes(self) -> int:
        """Encoded size of a shard index: 16 bytes per inner chunk plus the checksum."""
        assert self.shard_chunks is not None
        return 16 * math.prod(self.shard_chunks) + (4 if self.index_crc else 0)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> ArrayLayout | None:
        """The layout of a Zarr v3 array's metadata document; None for anything else (groups, v2 arrays)."""
        if meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
            return None
        encoding = meta.get("chunk_key_encoding", {})
        if (
            encoding.get("name") != "default"
            or encoding.get("configuration", {}).get("separator", "/") != "/"
        ):
            return None
        codecs = list(meta.get("codecs", ()))
        names = [c.get("name") for c in codecs]
        if names and names[0] == "sharding_indexed":
            config = codecs[0]["configuration"]
            shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
            inner = config["chunk_shape"]
            return cls(
                crc=[c.get("name") for c in config.get("codecs", ())][-1:] == ["crc32c"],
                shard_chunks=tuple(int(s) // int(c) for s, c in zip(shard, inner, strict=True)),
                index_crc=[c.get("name") for c in config.get("index_codecs", ())][-1:] == ["crc32c"],
                index_at_start=config.get("index_location", "end") == "start",
                shape=tuple(int(n) for n in meta["shape"]),
                inner_chunk=tuple(int(c) for c in inner),
            )
        return cls(crc=names[-1:] == ["crc32c"])


def writable(array: Any) -> Any:
    """``array`` (reopened from its store, e.g. to resume) configured to store every chunk it writes."""
    return array.with_config(WRITE_CONFIG)


def _checksum_ok(blob: bytes | memoryview) -> bool:
    """True when the last four bytes of ``blob`` are the little-endian CRC-32C of the bytes before them."""
    if len(blob) < 4:
        return False
    stored = int.from_bytes(bytes(blob[-4:]), "little")
    return int(google_crc32c.value(bytes(blob[:-4]))) == stored


class VerifiedStore(WrapperStore[LocalStore]):
    """A read-only local store that checks every chunk it hands to Zarr (see the module docstring).

    Args:
        store: the local store of one image group.
        where: the image's path as the user gave it (for messages).
        every_chunk_written: the store's metadata says every chunk was written (a missing one is an error).
    """

    def __init__(self, store: LocalStore, where: str = "", every_chunk_written: bool = False) -> None:
        super().__init__(store)
        self.where = where or str(store.root)
        self.every_chunk_written = every_chunk_written
        self._layouts: dict[str, ArrayLayout | None] = {}

    def _with_store(self, store: LocalStore) -> VerifiedStore:
        return VerifiedStore(store, self.where, self.every_chunk_written)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, VerifiedStore)
            and self._store == other._store
            and self.every_chunk_written == other.every_chunk_written
        )

    def __hash__(self) -> int:
        return hash((str(self._store.root), self.every_chunk_written))

    async def _layout(self, array: str) -> ArrayLayout | None:
        if array not in self._layouts:
            key = f"{array}/zarr.json" if array else "zarr.json"
            doc = await self._store.get(key, default_buffer_prototype())
            self._layouts[array] = (
                None if doc is None else ArrayLayout.from_metadata(json.loads(doc.to_bytes()))
            )
        return self._layouts[array]

    def _fail(self, array: str, coords: tuple[int, ...], problem: str, what: str = "chunk") -> ChunkError:
        """The error for ``what`` (``chunk`` or ``shard``) ``coords`` of ``array``."""
        name = array or "/"
        return ChunkError(
            f"{what} {coords} of array '{name}' in {self.where} is {problem}: the store was altered, "
            "truncated or lost a file: if PatchMorph wrote it, delete it and rerun the command that wrote it; if it is "
            "your data, restore it from its source."
        )

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        """The stored bytes of ``key``, after checking them when ``key`` is a chunk (or shard) of an array."""
        data = await self._store.get(key, prototype, byte_range)
        if key.endswith(_METADATA_SUFFIXES):
            return data
        if key.startswith("c/"):
            array, rest = "", key[2:]
        else:
            array, sep, rest = key.partition("/c/")
            if not sep:
                return data
        layout = await self._layout(array)
        if layout is None:
            return data
        try:
            coords = tuple(int(part) for part in rest.split("/"))
        except ValueError:
            return data
        self._check(array, coords, layout, data, byte_range)
        return data

    def _check(
        self,
        array: str,
        coords: tuple[int, ...],
        layout: ArrayLayout,
        data: Buffer | None,
        byte_range: ByteRequest | None,
    ) -> None:
        """Raise :class:`ChunkError` when the bytes read for chunk (or shard) ``coords`` are not sound."""
        if data is None:
            if self.every_chunk_written:
                raise self._fail(
                    array, coords, "missing", "chunk" if layout.shard_chunks is None else "shard"
                )
            return
        blob = data.to_bytes()
        if layout.shard_chunks is None:
            if layout.crc and byte_range is None and not _checksum_ok(blob):
                raise self._fail(array, coords, "corrupt (its checksum does not match its bytes)")
            return
        if byte_range is None:
            self._check_shard(array, coords, layout, blob)
        elif isinstance(byte_range, SuffixByteRequest) and byte_range.suffix == layout.index_bytes:
            self._check_index(array, coords, layout, blob)
        elif isinstance(byte_range, RangeByteRequest):
            if len(blob) != byte_range.end - byte_range.start or (layout.crc and not _checksum_ok(blob)):
                raise self._fail(array, coords, "corrupt (an inner chunk's checksum does not match)", "shard")

    def _check_index(
        self, array: str, coords: tuple[int, ...], layout: ArrayLayout, index: bytes
    ) -> np.ndarray:
        """The ``(n, 2)`` offsets and lengths of a shard's index, after checking its checksum and gaps."""
        assert layout.shard_chunks is not None
        if len(index) != layout.index_bytes or (layout.index_crc and not _checksum_ok(index)):
            raise self._fail(array, coords, "corrupt (its index does not match its checksum)", "shard")
        entries = np.frombuffer(index[: 16 * math.prod(layout.shard_chunks)], dtype="<u8").reshape(-1, 2)
        if self.every_chunk_written:
            for position in np.flatnonzero(entries[:, 0] == _EMPTY):
                inner = np.unravel_index(int(position), layout.shard_chunks)
                chunk = tuple(
                    int(c * n + i) for c, n, i in zip(coords, layout.shard_chunks, inner, strict=True)
                )
                starts = (c * size for c, size in zip(chunk, layout.inner_chunk, strict=True))
                if all(start < n for start, n in zip(starts, layout.shape, strict=True)):
                    raise self._fail(array, chunk, "missing from its shard")
        return entries

    def _check_shard(self, array: str, coords: tuple[int, ...], layout: ArrayLayout, shard: bytes) -> None:
        """Check a whole shard: its index, then every inner chunk the index points to."""
        size = layout.index_bytes
        if len(shard) < size:
            raise self._fail(array, coords, "truncated (shorter than its index)", "shard")
        index = shard[:size] if layout.index_at_start else shard[-size:]
        for position, (offset, length) in enumerate(self._check_index(array, coords, layout, index)):
            if offset == _EMPTY:
                continue
            inner = shard[int(offset) : int(offset) + int(length)]
            if len(inner) != int(length) or (layout.crc and not _checksum_ok(inner)):
                local = np.unravel_index(position, layout.shard_chunks)
                chunk = tuple(
                    int(c * n + i) for c, n, i in zip(coords, layout.shard_chunks, local, strict=True)
                )
                raise self._fail(array, chunk, "corrupt (its checksum does not match its bytes)")


def check_stored(array: Any) -> None:
    """Before heavy work: every chunk (shard) file of ``array`` is there, when its store says every chunk
    was written. Lists the array's chunk folder (cheap: a store over 1 GiB is sharded, so one file holds
    64 chunks); a chunk whose file exists but is damaged is found when it is read.

    Args:
        array: a ``zarr.Array`` opened through a :class:`VerifiedStore` (anything else is not checked).

    Raises:
        ChunkError: naming the first missing chunk (or shard).
    """
    store = getattr(array, "store", None)
    if not isinstance(store, VerifiedStore) or not store.every_chunk_written:
        return
    unit = tuple(array.shards) if array.shards is not None else tuple(array.chunks)
    counts = [-(-int(n) // int(u)) for n, u in zip(array.shape, unit, strict=True)]
    folder = Path(store._store.root) / array.path / "c"
    found = set()
    if folder.is_dir():
        for parent, _, names in os.walk(folder):
            prefix = Path(parent).relative_to(folder).parts
            for name in names:
                with contextlib.suppress(ValueError):
                    found.add(tuple(int(part) for part in (*prefix, name)))
    for coords in itertools.product(*(range(n) for n in counts)):
        if coords not in found:
            raise store._fail(array.path, coords, "missing", "chunk" if array.shards is None else "shard")
