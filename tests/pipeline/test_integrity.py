"""Chunk integrity: every chunk written carries a CRC-32C checksum and is written even when empty; a flipped,
truncated, emptied or deleted chunk of an image or a field is an error naming the store and the chunk."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from patchmorph_core.spatial import Grid
from pipeline import ngff
from pipeline.integrity import ChunkError


def _volume() -> tuple[np.ndarray, Grid]:
    """An anisotropic, non-cubic volume that is zero in most chunks (zeros must still be written)."""
    data = np.zeros((40, 50, 30), np.float32)
    data[10:20, 5:30, 3:9] = np.random.default_rng(0).random((10, 25, 6))
    return data, Grid.from_orientation(data.shape, (3.0, 2.0, 1.5), "psl", unit="micrometer")


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


DAMAGE: dict[str, Callable[[Path], None]] = {
    "flipped": _flip,
    "truncated": _truncate,
    "zero-length": _empty,
    "deleted": os.remove,
}


def test_every_chunk_is_written_with_a_checksum(tmp_path: Path) -> None:
    data, grid = _volume()
    out = ngff.write_image(tmp_path / "a.zarr", data, grid, chunks=(16, 16, 16), n_levels=2)
    array = zarr.open_group(str(out), mode="r")["0"]
    assert [type(c).__name__ for c in array.compressors] == ["BloscCodec", "Crc32cCodec"]
    stored = {p.relative_to(out / "0" / "c").as_posix() for p in (out / "0" / "c").rglob("*") if p.is_file()}
    expected = {f"{i}/{j}/{k}" for i in range(3) for j in range(4) for k in range(2)}
    assert stored == expected  # all 24 chunks, 19 of which hold only zeros
    level1 = zarr.open_group(str(out), mode="r")["1"]
    assert level1.nchunks_initialized == level1.nchunks
    image = pickle.loads(pickle.dumps(ngff.read_image(out)))  # as sent to Dask workers
    np.testing.assert_array_equal(np.asarray(image.levels[0].array[:]), data)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_image_chunk_is_an_error_naming_it(tmp_path: Path, damage: str) -> None:
    data, grid = _volume()
    out = ngff.write_image(tmp_path / "a.zarr", data, grid, chunks=(16, 16, 16))
    DAMAGE[damage](out / "0" / "c" / "2" / "1" / "0")
    image = ngff.read_image(out)
    np.testing.assert_array_equal(np.asarray(image.levels[0].array[:16]), data[:16])  # other chunks read
    with pytest.raises(ChunkError, match=r"chunk \(2, 1, 0\) of array '0' in .*a\.zarr is (corrupt|missing)"):
        np.asarray(image.levels[0].array[:])


@pytest.mark.parametrize("damage", ["flipped", "deleted"])
def test_damaged_field_chunk_is_an_error(tmp_path: Path, damage: str) -> None:
    grid = Grid.from_spacing((6, 7, 5), (2.0, 2.0, 2.0), unit="millimeter")
    field = np.random.default_rng(1).normal(size=(3, *grid.shape)).astype(np.float32)
    out = ngff.write_field(tmp_path / "f.zarr", field, grid, chunks=(4, 4, 4))
    DAMAGE[damage](out / "0" / "c" / "0" / "1" / "1" / "0")
    array, _, _ = ngff.read_field(out)
    with pytest.raises(ChunkError, match=r"chunk \(0, 1, 1, 0\) of array '0'"):
        np.asarray(array[:])


@pytest.mark.parametrize("damage", ["flipped", "truncated", "deleted"])
def test_damaged_shard_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    monkeypatch.setattr(ngff, "SHARD_THRESHOLD_BYTES", 1000)
    data, grid = _volume()
    out = ngff.write_image(tmp_path / "s.zarr", data, grid, chunks=(8, 8, 8))
    assert zarr.open_group(str(out), mode="r")["0"].shards == (32, 32, 32)
    image = ngff.read_image(out)
    np.testing.assert_array_equal(np.asarray(image.levels[0].array[:]), data)  # edge shards are sound
    DAMAGE[damage](out / "0" / "c" / "1" / "0" / "0")
    for box in (np.s_[:], np.s_[33:36, 2:5, 2:5]):  # the whole shard, and one inner chunk of it
        with pytest.raises(ChunkError, match=r"(shard|chunk) \(\d+, 0, 0\) of array '0' in .*s\.zarr"):
            np.asarray(ngff.read_image(out).levels[0].array[box])


def test_an_inner_chunk_missing_from_a_sound_shard_index_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard whose index (checksum intact) marks an inner chunk inside the array as never written is missing data,
    not fill values, in a store of ours."""
    import google_crc32c

    monkeypatch.setattr(ngff, "SHARD_THRESHOLD_BYTES", 1000)
    data, grid = _volume()
    out = ngff.write_image(tmp_path / "s.zarr", data, grid, chunks=(8, 8, 8))
    shard = out / "0" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    size = 16 * 4**3 + 4  # the index at the shard's end: (offset, length) per inner chunk, then its CRC-32C
    index = bytearray(raw[-size:-4])
    index[0:16] = b"\xff" * 16  # inner chunk (0, 0, 0) of shard (1, 0, 0): array chunk (4, 0, 0), inside the array
    raw[-size:] = bytes(index) + int(google_crc32c.value(bytes(index))).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    with pytest.raises(ChunkError, match=r"chunk \(4, 0, 0\) of array '0' in .*s\.zarr is missing"):
        np.asarray(ngff.read_image(out).levels[0].array[:])


def test_missing_chunk_of_a_foreign_store_is_its_fill_value(tmp_path: Path) -> None:
    """Zarr writers other than ours may leave chunks that hold only the fill value unwritten."""
    data, grid = _volume()
    out = ngff.write_image(tmp_path / "a.zarr", data, grid, chunks=(16, 16, 16))
    group = zarr.open_group(str(out), mode="r+")
    attrs = dict(group.attrs["patchmorph"])
    attrs.pop("every_chunk_written")
    group.attrs["patchmorph"] = attrs
    os.remove(out / "0" / "c" / "2" / "1" / "0")
    np.testing.assert_array_equal(np.asarray(ngff.read_image(out).levels[0].array[:]), data)


def test_an_array_reopened_to_resume_still_stores_chunks_of_zeros(tmp_path: Path) -> None:
    """Zarr keeps 'write every chunk' only in the open array, not in its metadata: a resumed run reopens the
    array and must still store a chunk that is all zeros (else it would read as missing, and be lost)."""
    grid = Grid.from_spacing((8, 6, 4), (1.0, 2.0, 3.0), unit="millimeter")
    first = ngff.create_image_array(tmp_path / "o.zarr", grid.shape, grid, np.float32, (4, 3, 4))
    first[0:4, 0:3, :] = 1.0
    again = ngff.create_image_array(tmp_path / "o.zarr", grid.shape, grid, np.float32, (4, 3, 4), resume=True)
    again[4:8, 0:3, :] = 0.0
    assert (tmp_path / "o.zarr" / "0" / "c" / "1" / "0" / "0").is_file()


@pytest.mark.parametrize("damage", ["flipped", "truncated", "zero-length"])
def test_damaged_level_metadata_is_one_sentence(tmp_path: Path, damage: str) -> None:
    """A level's ``zarr.json`` that is no longer JSON: an input error naming the store and the level, not a
    decoder's traceback (an image and a field alike)."""
    from patchmorph_core.errors import InputError

    data, grid = _volume()
    image = ngff.write_image(tmp_path / "a.zarr", data, grid, chunks=(16, 16, 16))
    field = ngff.write_field(tmp_path / "f.zarr", np.zeros((3, 6, 7, 5), np.float32), Grid.from_spacing((6, 7, 5), (2.0,) * 3))
    for path, read in ((image, ngff.read_image), (field, ngff.read_field)):
        DAMAGE[damage](path / "0" / "zarr.json")
        with pytest.raises(InputError, match=r"level '0' has unreadable metadata .* the store is damaged"):
            read(path)
