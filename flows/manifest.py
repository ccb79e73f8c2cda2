"""The manifest of the atlas-to-section flow: which brains or sections to align, with their geometry.

A manifest is a YAML file (a list of items, or a mapping with an ``items`` list) or a CSV file (one
row per item; columns ``path``, ``name``, ``channel_index``, ``voxel_size``, ``unit``, ``orientation``, ``labels``,
``brain_geometry``, ``atlas_range`` (e.g. ``ap=6200:9200``, or ``ap=auto``), ``channels`` (separated by ``;``); the
voxel size is three numbers ``z y x`` separated by spaces, ``x`` or ``;``). Relative paths are taken
from the manifest's folder. Of a multi-channel file (a bioformats2raw OME-Zarr, given as its top folder or as its
series ``brain.zarr/0``, or an ImageJ TIFF hyperstack) ``channel_index`` is the channel the atlas is registered to,
and a channel of it is written ``PATH:N`` in ``channels`` (``brain.zarr:1``; its outputs are named ``brain_ch1``).
A channel index the file lacks is that item's error, found from the file's header before any conversion. Example
(YAML)::

    - path: brains/brain01.ome.zarr           # OME-Zarr carries its own geometry
    - path: brains/brain02_planes/             # a TIFF plane folder needs voxel size and orientation
      voxel_size: [50, 40, 40]                 # (z, y, x)
      unit: micrometer
      orientation: psl
      labels: brains/brain02_labels.nii.gz     # optional: the sample's own labels, scored by Dice
    - path: brains/brain03.zarr                # two channels: 0 autofluorescence, 1 signal
      channel_index: 0
      channels: [brains/brain03.zarr:1]

An item whose entry is invalid does not stop the batch: :func:`load_manifest` returns it as a
:class:`ManifestProblem`, which the flow reports as that item's error record.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flows.config import Geometry
from patchmorph_core.errors import InputError
from pipeline.atlas import AtlasRangeRequest, BrainGeometry, parse_atlas_range, range_text
from pipeline.importers import ImageChannel
from pipeline.ngff import series_store

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")

MAX_NAME_LENGTH = 64
"""Longest item name (an output folder name; longer names keep their start and a hash of the whole)."""

RESERVED_NAMES = frozenset({"atlas", "report.md", "report.json"})
"""What the atlas-to-section flow itself writes into its output folder (compared without case); the folders of
the atlas prepared for a brain geometry or atlas range (:func:`prepared_folder_name`) are refused as names
(:func:`prepared_folder_clash`)."""

_RANGE_PART = re.compile(r"([a-z]+)(.+)")


def prepared_folder_name(geometry: str, text: str) -> str:
    """The folder name of the atlas prepared for a brain ``geometry`` and an atlas range ``text`` (as
    :func:`pipeline.atlas.range_text` writes it; empty: the whole atlas): ``atlas`` for whole brains,
    ``atlas_<geometry>`` for a hemisphere, each with ``_<range>`` appended for a range (e.g.
    ``atlas_ap6200-9200``)."""
    parts = ["atlas", *([geometry] if geometry != "full" else [])]
    if text:
        parts.append(text.replace("=", "").replace(":", "-").replace(",", "_"))
    return "_".join(parts)


def _range_of_part(part: str) -> str | None:
    """The range text (``ap=6200:9200``) whose folder part (:func:`prepared_folder_name`) is ``part``, or None."""
    match = _RANGE_PART.fullmatch(part)
    if match is None:
        return None
    direction, span = match.groups()
    for cut in (i for i, char in enumerate(span) if char == "-"):
        try:
            text = range_text(parse_atlas_range([f"{direction}={span[:cut]}:{span[cut + 1 :]}"]))
        except InputError:
            continue
        if prepared_folder_name("full", text) == f"atlas_{part}":
            return text
    return None


def prepared_folder_clash(name: str) -> str | None:
    """What the atlas-to-section flow prepares in the folder ``name`` (compared without case), e.g.
    ``"brain_geometry hemisphere_l"`` or ``"atlas_range ap=6200:9200"``, or None when it is no such folder's name.
    Read back through :func:`prepared_folder_name`, so that every name it can produce is found."""
    lower = name.lower()
    if not lower.startswith("atlas_"):
        return None
    tail, geometry = lower.removeprefix("atlas_"), "full"
    for option in get_args(BrainGeometry):
        if tail == option or tail.startswith(f"{option}_"):
            tail, geometry = tail.removeprefix(option).removeprefix("_"), option
    texts = [_range_of_part(part) for part in tail.split("_")] if tail else []
    if any(text is None for text in texts):
        return None
    text = ",".join(t for t in texts if t)
    if prepared_folder_name(geometry, text) != lower:
        return None
    described = [*([f"brain_geometry {geometry}"] if geometry != "full" else []), *([f"atlas_range {text}"] if text else [])]
    return " and ".join(described)


class ManifestItem(Geometry):
    """One brain or section to align to the atlas.

    Attributes:
        name: output folder name (default: the file name without extensions); unique in a manifest.
        path: the image (OME-Zarr, NIfTI, NRRD, TIFF stack or TIFF plane folder).
        channel_index: of a multi-channel OME-Zarr image or TIFF stack at ``path``, the channel (0-based) the atlas
            is registered to.
        voxel_size: ``(z, y, x)`` voxel size in ``unit``; needed when the file does not carry it.
        unit: physical unit of ``voxel_size`` (None: the file's, micrometer for TIFF).
        orientation: anatomical orientation code (brainglobe convention, e.g. ``"psl"``).
        labels: optional label map of the sample itself; when given, Dice against the warped atlas labels
            is reported.
        brain_geometry: ``full``, or ``hemisphere_l`` / ``hemisphere_r`` for one imaged hemisphere (with a
            BrainGlobe atlas: its other hemisphere is left out, :func:`pipeline.atlas.prepare_atlas`).
        atlas_range: the part of the atlas the brain holds (:data:`pipeline.atlas.AtlasRange`, µm of the atlas's
            coordinates; in the manifest ``"ap=6200:9200"``, ``"ap=..,dv=.."`` or a list of such strings, as
            ``patchmorph atlas --atlas-range`` takes them): with a BrainGlobe atlas it is left out beyond it.
            ``"ap=auto"``: the range is found on the item's converted brain before the atlas is cut to it
            (:func:`flows.atlas_to_section.placed_items`). Empty: the whole atlas.
        channels: extra channels imaged with the brain (same shape and geometry; each a path, or ``PATH:N`` for
            channel N of a multi-channel file; in a CSV one cell, separated by ``;``): with a BrainGlobe atlas each
            is written in atlas space with its ``<channel>_signal.csv``, as ``patchmorph atlas --channel`` does.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    path: Path
    channel_index: int | None = Field(None, ge=0)
    labels: Path | None = None
    brain_geometry: BrainGeometry = "full"
    atlas_range: AtlasRangeRequest = {}
    channels: tuple[ImageChannel, ...] = ()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        cleaned = _SAFE_NAME.sub("_", value).strip("._")
        if not cleaned:
            raise ValueError(f"name {value!r} has no usable characters; use letters, digits, '-', '_'")
        if len(cleaned) > MAX_NAME_LENGTH:
            digest = hashlib.sha256(value.encode()).hexdigest()[:8]
            cleaned = f"{cleaned[: MAX_NAME_LENGTH - 9].rstrip('._')}-{digest}"
        return cleaned


class ManifestProblem(BaseModel):
    """A manifest entry that could not be read as a :class:`ManifestItem`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    message: str


def default_name(path: str | Path) -> str:
    """Item name from a path: the file or folder name without ``.ome.zarr``, ``.zarr``, ``.nii.gz`` etc. (of a
    bioformats2raw series ``brain.zarr/0``, the store's: ``brain``)."""
    name = series_store(Path(str(path).rstrip("/"))).name
    for suffix in (".ome.zarr", ".zarr", ".nii.gz", ".nii", ".nrrd", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _parse_voxel_size(value: Any) -> Any:
    """CSV voxel size ``"50 40 40"`` / ``"50x40x40"`` / ``"50;40;40"`` → list of three strings."""
    if isinstance(value, str):
        text = value.strip()
        return [part for part in re.split(r"[\sx;]+", text) if part] if text else None
    return value


def _voxel_size_count(value: Any) -> int | None:
    """How many numbers a parsed ``voxel_size`` list holds when that is not three (None: three, or not a list)."""
    if isinstance(value, list | tuple) and len(value) != 3:
        return len(value)
    return None


def _parse_item_range(value: Any, name: str) -> AtlasRangeRequest:
    """An item's ``atlas_range`` (a string ``"ap=6200:9200"`` or ``"ap=auto"``, several comma-separated, or a list
    of such strings; µm) as an :data:`pipeline.atlas.AtlasRangeRequest`.

    Raises:
        InputError: one sentence naming the item and what is wrong with the value.
    """
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InputError(
            f"manifest item {name!r}: atlas_range {value!r} is not a string such as 'ap=6200:9200' (or a list of "
            "such strings): fix that entry."
        )
    return parse_atlas_range(texts, option=f"manifest item {name!r}: atlas_range", auto=True)


def where_relative(path: str | Path) -> str:
    """For a relative ``path`` that was not found, the folder it was looked for in, as a clause of an error
    sentence: a deployment's flow runs start in the project folder (``prefect.yaml``'s), not in the folder where
    ``prefect deployment run`` was typed, so a relative parameter is not read from there. Empty when absolute."""
    if Path(path).is_absolute():
        return ""
    return (
        f" (a relative path is read from the folder the flow runs in, {Path.cwd()}, for a deployment the "
        "project's folder: give an absolute path)"
    )


def _rows_from_file(path: Path) -> list[dict[str, Any]]:
    """Raw entries of a YAML or CSV manifest (structure errors raise :class:`InputError`)."""
    if not path.is_file():
        raise InputError(
            f"manifest {path} does not exist{where_relative(path)}: give the path of a YAML or CSV manifest file."
        )
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            rows = [
                {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
                for row in csv.DictReader(handle)
            ]
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in rows]
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"manifest {path} is not valid YAML ({err}): fix its syntax.") from err
    if isinstance(data, dict) and set(data) == {"items"}:
        data = data["items"]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise InputError(
            f"manifest {path} must be a list of items (each a mapping with at least 'path'), "
            "or a mapping with one key 'items' holding that list."
        )
    return data


def _item_from_row(row: dict[str, Any], folder: Path, index: int) -> ManifestItem | ManifestProblem:
    """Validate one raw entry; relative paths are resolved against ``folder``."""
    entry = dict(row)
    raw_path = entry.get("path")
    name = str(entry.get("name") or (default_name(raw_path) if raw_path else f"item{index:03d}"))
    if not raw_path:
        return ManifestProblem(name=name, message=f"manifest item {index} has no 'path': add the image path.")
    entry["name"] = name
    entry["path"] = folder / str(raw_path)
    if entry.get("labels"):
        entry["labels"] = folder / str(entry["labels"])
    if isinstance(entry.get("channels"), str):  # a CSV cell: paths separated by ';'
        entry["channels"] = [c.strip() for c in entry["channels"].split(";") if c.strip()]
    if isinstance(entry.get("channels"), list):
        entry["channels"] = [ImageChannel.parse(str(c), folder) for c in entry["channels"]]
    if "voxel_size" in entry:
        entry["voxel_size"] = _parse_voxel_size(entry["voxel_size"])
        count = _voxel_size_count(entry["voxel_size"])
        if count is not None:
            return ManifestProblem(
                name=name,
                message=(
                    f"manifest item {name!r}: voxel_size {row['voxel_size']!r} holds {count} numbers, not three: give "
                    "the voxel size along z, y and x (z the plane axis), e.g. [50, 40, 40], or '50 40 40' in a CSV cell."
                ),
            )
    if "atlas_range" in entry:
        try:
            entry["atlas_range"] = _parse_item_range(entry["atlas_range"], name)
        except InputError as err:
            return ManifestProblem(name=name, message=str(err))
    try:
        item = ManifestItem.model_validate(entry)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<item>"
        return ManifestProblem(
            name=name, message=f"manifest item {name!r}: {key} is invalid ({first['msg']}); fix that entry."
        )
    clash = prepared_folder_clash(item.name)
    if clash is not None:
        return ManifestProblem(
            name=item.name,
            message=(
                f"manifest item {item.name!r}: its output folder would be the one where the batch prepares the atlas "
                f"for {clash}, and the two would overwrite each other: give the item another name."
            ),
        )
    return item


def load_manifest(path: str | Path) -> list[ManifestItem | ManifestProblem]:
    """Read a YAML or CSV manifest.

    Args:
        path: the manifest file (``.yaml``/``.yml`` or ``.csv``).

    Returns:
        One :class:`ManifestItem` per valid entry and one :class:`ManifestProblem` per invalid one, in
        file order. Names are unique by construction (:func:`unique_names`): never equal, without case, to
        another item's or to one of :data:`RESERVED_NAMES`, at most :data:`MAX_NAME_LENGTH` characters.

    Raises:
        InputError: the file is missing, unreadable or not a list of items.
    """
    path = Path(path)
    rows = _rows_from_file(path)
    if not rows:
        raise InputError(f"manifest {path} lists no items: add at least one item with a 'path'.")
    folder = path.resolve().parent
    items = [_item_from_row(row, folder, index) for index, row in enumerate(rows)]
    names = unique_names([item.name for item in items], RESERVED_NAMES)
    return [item.model_copy(update={"name": name}) for item, name in zip(items, names, strict=True)]


def unique_names(names: list[str], reserved: frozenset[str] = frozenset()) -> list[str]:
    """``names`` made unique, in order: a name already taken (without case, so that case-insensitive file
    systems keep them apart too) or reserved gets the first free suffix ``-2``, ``-3``, ...

    >>> unique_names(["dup", "dup", "dup-2", "Atlas"], frozenset({"atlas"}))
    ['dup', 'dup-2', 'dup-2-2', 'Atlas-2']
    """
    taken = {name.lower() for name in reserved}
    out = []
    for name in names:
        candidate, count = name, 1
        while candidate.lower() in taken:
            count += 1
            suffix = f"-{count}"
            candidate = f"{name[: MAX_NAME_LENGTH - len(suffix)]}{suffix}"
        taken.add(candidate.lower())
        out.append(candidate)
    return out
