"""BrainGlobe atlases, read offline: by name from the BrainGlobe folder, or from an atlas folder's path.

Two on-disk layouts are read (both as brainglobe-atlasapi writes them; no network is used):

* **TIFF layout** (one folder per atlas and version, ``<brainglobe_dir>/<name>_v<version>/``):
  ``metadata.json`` (``resolution`` in µm per array axis, ``orientation``, ``shape``, ``symmetric``),
  ``structures.json`` (a list of ``{id, name, acronym, structure_id_path, rgb_triplet}``),
  ``reference.tiff``, ``annotation.tiff`` and, for atlases that are not symmetric, ``hemispheres.tiff``.
* **OME-Zarr layout** (``<brainglobe_dir>/brainglobe-atlasapi/atlases/<name>/<version>/manifest.json``):
  the manifest names its components by location under the folder three levels up:
  ``templates/.../template.ome.zarr``, ``annotation-sets/.../annotations_compressed.ome.zarr`` and
  ``hemispheres.ome.zarr``, ``terminologies/.../terminology.csv``. The images are OME-Zarr pyramids in
  millimetres whose axes carry RFC-4 anatomical orientations; the level whose scale equals the
  manifest's ``resolution`` is the atlas.

Array conventions: every atlas array is ``(z, y, x)`` in the atlas's own orientation code (BrainGlobe
atlases are ``asr``: axis 0 runs anterior→posterior, 1 superior→inferior, 2 right→left); hemisphere
values are 1 = left and 2 = right. A symmetric atlas has no hemisphere volume: it is made as BrainGlobe
makes it, by splitting the left-right axis at ``round(n / 2)``.

Where atlases are looked for by name: ``$BRAINGLOBE_DIR`` when set, else the ``brainglobe_dir`` of
BrainGlobe's configuration file (``$BRAINGLOBE_CONFIG_DIR`` or ``~/.config/brainglobe/bg_config.conf``)
and ``~/.brainglobe``.
"""

from __future__ import annotations

import configparser
import csv
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from patchmorph_core.errors import InputError
from patchmorph_core.spatial import Grid, orientation_matrix, unit_scale

logger = logging.getLogger(__name__)

LEFT, RIGHT = 1, 2
"""Hemisphere values (BrainGlobe convention)."""

METADATA_FILE = "metadata.json"
STRUCTURES_FILE = "structures.json"
MANIFEST_FILE = "manifest.json"
TIFF_FILES: dict[str, str] = {
    "reference": "reference.tiff",
    "annotation": "annotation.tiff",
    "hemispheres": "hemispheres.tiff",
}
"""File of each volume in the TIFF layout."""

ZARR_FILES: dict[str, tuple[str, str]] = {
    "reference": ("template", "template.ome.zarr"),
    "annotation": ("annotation_set", "annotations_compressed.ome.zarr"),
    "hemispheres": ("annotation_set", "hemispheres.ome.zarr"),
}
"""Manifest component and file name of each volume in the OME-Zarr layout."""

Layout = Literal["tiff", "ome-zarr"]


@dataclass(frozen=True)
class Structure:
    """One atlas structure.

    Attributes:
        id: the value the annotation volume holds for it.
        name: full name (``"Primary motor area"``).
        acronym: short name (``"MOp"``).
        path: ids from the root of the hierarchy down to this structure (inclusive).
        rgb: its colour (BrainGlobe's ``rgb_triplet``; white when the atlas gives none).
    """

    id: int
    name: str
    acronym: str
    path: tuple[int, ...] = ()
    rgb: tuple[int, int, int] = (255, 255, 255)


@dataclass(frozen=True)
class AtlasVolume:
    """Where one volume of an atlas lives: a TIFF file, or one level of an OME-Zarr pyramid."""

    path: Path
    level: int = 0


@dataclass(frozen=True)
class BrainGlobeAtlas:
    """A BrainGlobe atlas found on disk (nothing is read but its metadata and structures).

    Attributes:
        name: atlas name with its resolution, e.g. ``"allen_mouse_100um"``.
        version: atlas version, e.g. ``"1.2"``.
        folder: the atlas folder (TIFF layout) or the folder of its ``manifest.json``.
        layout: ``"tiff"`` or ``"ome-zarr"``.
        resolution_um: voxel size of the arrays, µm, per array axis ``(z, y, x)``.
        orientation: orientation code of the arrays (``"asr"`` for BrainGlobe atlases).
        shape: ``(Z, Y, X)`` of the arrays.
        symmetric: True when the atlas has no hemisphere volume (it is split at the midline).
        volumes: ``reference``, ``annotation`` and (unless symmetric) ``hemispheres``.
        structures: annotation value → :class:`Structure`.
        metadata: the metadata document as read.
    """

    name: str
    version: str
    folder: Path
    layout: Layout
    resolution_um: tuple[float, float, float]
    orientation: str
    shape: tuple[int, int, int]
    symmetric: bool
    volumes: Mapping[str, AtlasVolume]
    structures: Mapping[int, Structure]
    metadata: Mapping[str, Any]

    @property
    def grid(self) -> Grid:
        """The arrays' grid in micrometres, in the atlas's orientation, centred on the world origin."""
        return Grid.from_orientation(self.shape, self.resolution_um, self.orientation, unit="micrometer")

    def describe(self) -> dict[str, Any]:
        """Plain facts for a run's metadata: name, version, layout, folder, resolution, orientation, shape."""
        return {
            "name": self.name,
            "version": self.version,
            "layout": self.layout,
            "folder": str(self.folder),
            "resolution_um": list(self.resolution_um),
            "orientation": self.orientation,
            "shape": list(self.shape),
            "symmetric": self.symmetric,
            "citation": self.metadata.get("citation"),
        }


# -- where atlases live -------------------------------------------------------------------------------------
def brainglobe_dirs(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Folders searched for atlases by name, in order (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("BRAINGLOBE_DIR"):
        return [Path(env["BRAINGLOBE_DIR"]).expanduser()]
    home = Path(env.get("HOME", str(Path.home())))
    dirs: list[Path] = []
    config_dir = Path(env.get("BRAINGLOBE_CONFIG_DIR", str(home / ".config" / "brainglobe")))
    config_file = config_dir / "bg_config.conf"
    if config_file.is_file():
        parser = configparser.ConfigParser()
        parser.read(config_file)
        configured = parser.get("default_dirs", "brainglobe_dir", fallback=None)
        if configured:
            dirs.append(Path(configured).expanduser())
    default = home / ".brainglobe"
    if default not in dirs:
        dirs.append(default)
    return dirs


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _candidates(root: Path, name: str) -> list[tuple[tuple[int, ...], Path]]:
    """``(version, path)`` of every copy of atlas ``name`` under ``root`` (both layouts)."""
    found: list[tuple[tuple[int, ...], Path]] = []
    if root.is_dir():
        for folder in root.glob(f"{name}_v*"):
            if (folder / METADATA_FILE).is_file():
                found.append((_version_key(folder.name[len(name) + 2 :]), folder))
        for base in (root / "brainglobe-atlasapi" / "atlases", root / "atlases"):
            for manifest in base.glob(f"{name}/*/{MANIFEST_FILE}"):
                found.append((_version_key(manifest.parent.name), manifest.parent))
    return found


def installed_atlases(dirs: Iterable[Path] | None = None) -> list[str]:
    """Names of the atlases found in the BrainGlobe folders (both layouts), sorted."""
    names: set[str] = set()
    for root in brainglobe_dirs() if dirs is None else dirs:
        if not root.is_dir():
            continue
        for metadata in root.glob(f"*_v*/{METADATA_FILE}"):
            names.add(metadata.parent.name.rsplit("_v", 1)[0])
        for base in (root / "brainglobe-atlasapi" / "atlases", root / "atlases"):
            names.update(m.parent.parent.name for m in base.glob(f"*/*/{MANIFEST_FILE}"))
    return sorted(names)


def find_atlas(atlas: str | Path, dirs: Sequence[Path] | None = None) -> BrainGlobeAtlas:
    """The BrainGlobe atlas named ``atlas``, or the one in the folder ``atlas`` (see the module docstring).

    A path (an existing folder or ``manifest.json``) is read as it is; a name is looked up in ``dirs``
    (default :func:`brainglobe_dirs`) and its latest installed version is taken.

    Raises:
        InputError: no such atlas folder or name, or an atlas folder that is incomplete.
    """
    path = Path(atlas).expanduser()
    if path.is_file() and path.name == MANIFEST_FILE:
        return read_atlas(path.parent)
    if path.is_dir():
        return read_atlas(path)
    text = str(atlas)
    if os.sep in text or text.startswith("."):
        raise InputError(
            f"atlas folder {text!r} does not exist: give a BrainGlobe atlas folder or an atlas name."
        )
    roots = brainglobe_dirs() if dirs is None else list(dirs)
    found = [c for root in roots for c in _candidates(root, text)]
    if not found:
        installed = installed_atlases(roots)
        where = ", ".join(str(r) for r in roots)
        listing = f" (installed: {', '.join(installed)})" if installed else " (none is installed there)"
        raise InputError(
            f"atlas {text!r} is not in {where}{listing}: install it with BrainGlobe "
            f"('brainglobe install -a {text}') on a machine with network access, set BRAINGLOBE_DIR to the "
            "folder that holds it, or give the atlas folder's path."
        )
    return read_atlas(max(found, key=lambda item: item[0])[1])


# -- reading ------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"atlas file {path} is not readable JSON ({err}): reinstall the atlas.") from err


def read_atlas(folder: str | Path) -> BrainGlobeAtlas:
    """Read an atlas folder of either layout (``metadata.json`` or ``manifest.json`` inside it). The atlas's
    ``folder`` is the absolute path: jobs record it, and later commands run from other working folders read it."""
    folder = Path(folder).expanduser().resolve()
    if (folder / METADATA_FILE).is_file():
        return _read_tiff_layout(folder)
    if (folder / MANIFEST_FILE).is_file():
        return _read_zarr_layout(folder)
    raise InputError(
        f"{folder} holds neither {METADATA_FILE} nor {MANIFEST_FILE}: give a BrainGlobe atlas folder "
        "(e.g. ~/.brainglobe/allen_mouse_25um_v1.2)."
    )


def _geometry(
    meta: Mapping[str, Any], where: Path
) -> tuple[tuple[float, float, float], str, tuple[int, int, int]]:
    """Resolution (µm), orientation code and shape from an atlas metadata document."""
    try:
        resolution = tuple(float(v) for v in meta["resolution"])
        shape = tuple(int(v) for v in meta["shape"])
        orientation = str(meta.get("orientation", "asr")).lower()
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(
            f"atlas metadata in {where} lacks resolution or shape ({err}): reinstall the atlas."
        ) from err
    if len(resolution) != 3 or len(shape) != 3 or min(resolution) <= 0 or min(shape) < 1:
        raise InputError(
            f"atlas metadata in {where} has resolution {resolution} and shape {shape}: reinstall the atlas."
        )
    orientation_matrix(orientation)
    return resolution, orientation, shape  # type: ignore[return-value]


def _read_tiff_layout(folder: Path) -> BrainGlobeAtlas:
    meta = _read_json(folder / METADATA_FILE)
    resolution, orientation, shape = _geometry(meta, folder)
    symmetric = bool(meta.get("symmetric", False))
    volumes = {role: AtlasVolume(folder / name) for role, name in TIFF_FILES.items()}
    if not volumes["hemispheres"].path.is_file():
        if not symmetric:
            raise InputError(
                f"atlas {folder} is not symmetric but has no {TIFF_FILES['hemispheres']}: reinstall it."
            )
        del volumes["hemispheres"]
    for role, volume in volumes.items():
        if not volume.path.is_file():
            raise InputError(f"atlas {folder} has no {volume.path.name} ({role}): reinstall the atlas.")
    structures = structures_from_list(_read_json(folder / STRUCTURES_FILE), folder / STRUCTURES_FILE)
    name = f"{meta.get('name', folder.name)}_{resolution[0]:g}um"
    return BrainGlobeAtlas(
        name=name,
        version=str(meta.get("version", "")),
        folder=folder,
        layout="tiff",
        resolution_um=resolution,
        orientation=orientation,
        shape=shape,
        symmetric=symmetric and "hemispheres" not in volumes,
        volumes=volumes,
        structures=structures,
        metadata=meta,
    )


def _component_folder(root: Path, meta: Mapping[str, Any], component: str, where: Path) -> Path:
    try:
        entry = meta[component] if component != "template" else meta["annotation_set"]["template"]
        return root / str(entry["location"]).lstrip("/")
    except (KeyError, TypeError) as err:
        raise InputError(
            f"atlas manifest {where} lacks the {component} location: reinstall the atlas."
        ) from err


def _level_for_resolution(path: Path, resolution_um: Sequence[float]) -> int:
    """The pyramid level of an OME-Zarr atlas volume whose voxel size equals the atlas resolution."""
    from pipeline.ngff import read_image

    image = read_image(path)
    for index, level in enumerate(image.levels):
        spacing_um = level.grid.spacing * unit_scale(level.grid.unit, "micrometer")
        if np.allclose(spacing_um, resolution_um, rtol=1e-4):
            return index
    raise InputError(
        f"atlas volume {path} has no pyramid level at {list(resolution_um)} µm: reinstall the atlas."
    )


def _read_zarr_layout(folder: Path) -> BrainGlobeAtlas:
    manifest = folder / MANIFEST_FILE
    meta = _read_json(manifest)
    resolution, orientation, shape = _geometry(meta, folder)
    root = folder.parents[2]
    volumes: dict[str, AtlasVolume] = {}
    for role, (component, file_name) in ZARR_FILES.items():
        path = _component_folder(root, meta, component, manifest) / file_name
        if not path.is_dir():
            if role == "hemispheres":
                continue
            raise InputError(f"atlas {folder} has no {role} volume at {path}: reinstall the atlas.")
        volumes[role] = AtlasVolume(path, _level_for_resolution(path, resolution))
    from pipeline.ngff import image_orientation

    stored = image_orientation(volumes["reference"].path)
    if stored is not None and stored != orientation:
        raise InputError(
            f"atlas {folder}: the RFC-4 orientation of its template's axes ({stored}) disagrees with its "
            f"manifest's orientation ({orientation}): reinstall the atlas."
        )
    if stored is None:
        logger.warning(
            "atlas %s: its template's axes carry no RFC-4 orientation; using the manifest's %s",
            folder,
            orientation,
        )
    symmetric = bool(meta.get("symmetric", False)) or "hemispheres" not in volumes
    if meta.get("symmetric"):
        volumes.pop("hemispheres", None)  # BrainGlobe splits a symmetric atlas whatever files it has
    terminology = _component_folder(root, meta, "terminology", manifest) / "terminology.csv"
    structures = structures_from_terminology(terminology)
    return BrainGlobeAtlas(
        name=f"{meta.get('name', folder.parent.name)}_{resolution[0]:g}um",
        version=str(meta.get("version", folder.name.replace("_", "."))),
        folder=folder,
        layout="ome-zarr",
        resolution_um=resolution,
        orientation=orientation,
        shape=shape,
        symmetric=symmetric,
        volumes=volumes,
        structures=structures,
        metadata=meta,
    )


def structures_from_list(items: Any, where: Path) -> dict[int, Structure]:
    """Structures from BrainGlobe's ``structures.json`` list (``id``, ``name``, ``acronym``, path)."""
    if not isinstance(items, list) or not items:
        raise InputError(f"{where} holds no structure list: reinstall the atlas.")
    structures: dict[int, Structure] = {}
    for item in items:
        try:
            sid = int(item["id"])
            path = tuple(int(v) for v in item.get("structure_id_path") or (sid,))
            rgb = tuple(int(v) for v in item.get("rgb_triplet") or (255, 255, 255))[:3]
            structures[sid] = Structure(sid, str(item["name"]), str(item.get("acronym", "")), path, rgb)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(
                f"{where} has a structure without id or name ({err}): reinstall the atlas."
            ) from err
    return structures


def structures_from_terminology(path: Path) -> dict[int, Structure]:
    """Structures from the OME-Zarr layout's ``terminology.csv``, keyed by ``annotation_value``."""
    if not path.is_file():
        raise InputError(f"atlas terminology {path} does not exist: reinstall the atlas.")
    structures: dict[int, Structure] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                value = int(row.get("annotation_value") or row["identifier"])
                ids = tuple(int(v) for v in re.findall(r"\d+", row.get("root_identifier_path", "")))
                structures[value] = Structure(
                    value, row["name"], row.get("abbreviation", ""), ids or (value,)
                )
            except (KeyError, ValueError) as err:
                raise InputError(
                    f"{path} has a row without identifier or name ({err}): reinstall the atlas."
                ) from err
    if not structures:
        raise InputError(f"{path} lists no structures: reinstall the atlas.")
    return structures


def allen_structures(path: str | Path) -> list[Structure]:
    """Structures of an Allen ontology file (``.json`` or ``.json.gz``: the API's nested ``msg`` tree), with
    their paths from ``root`` (id 997) down; nodes above the root (ClearMap's ``universe``) are left out."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        raise InputError(
            f"ontology {path} is not a readable JSON file ({err}): give the Allen ontology."
        ) from err
    roots = data.get("msg", data) if isinstance(data, dict) else data
    stack: list[tuple[Any, tuple[int, ...]]] = [
        (node, ()) for node in (roots if isinstance(roots, list) else [roots])
    ]
    found: list[Structure] = []
    while stack:
        node, above = stack.pop()
        if not isinstance(node, dict) or "id" not in node:
            continue
        sid = int(node["id"])
        path_ids = (*above, sid) if above or sid == 997 else ()
        if path_ids:
            found.append(Structure(sid, str(node.get("name", "")), str(node.get("acronym", "")), path_ids))
        stack.extend((child, path_ids) for child in node.get("children", []) or [])
    if not found:
        raise InputError(
            f"ontology {path} holds no structure under the root (id 997): give the Allen ontology."
        )
    return sorted(found, key=lambda s: s.id)


# -- volumes --------------------------------------------------------------------------------------------------
def open_volume(atlas: BrainGlobeAtlas, role: str) -> tuple[Any, Grid]:
    """A lazy ``(Z, Y, X)`` array of one atlas volume and its grid (the atlas grid of :attr:`BrainGlobeAtlas.grid`).

    Args:
        atlas: the atlas.
        role: ``"reference"``, ``"annotation"`` or ``"hemispheres"`` (a symmetric atlas's hemispheres are
            computed, :func:`midline_hemispheres`).

    Raises:
        InputError: a volume whose shape disagrees with the atlas metadata.
    """
    import dask.array as da

    if role == "hemispheres" and "hemispheres" not in atlas.volumes:
        return da.from_array(midline_hemispheres(atlas.shape, atlas.orientation), chunks=64), atlas.grid
    volume = atlas.volumes[role]
    if atlas.layout == "tiff":
        import tifffile
        import zarr

        store = tifffile.imread(volume.path, aszarr=True)
        array = da.from_zarr(zarr.open(store, mode="r"))
    else:
        from pipeline.ngff import read_image

        level = read_image(volume.path).levels[volume.level]
        array = level.array if isinstance(level.array, da.Array) else da.from_zarr(level.array)
    if tuple(array.shape) != atlas.shape:
        raise InputError(
            f"atlas {role} volume {volume.path} has shape {tuple(array.shape)}, its metadata says {atlas.shape}: "
            "reinstall the atlas."
        )
    return array, atlas.grid


def midline_hemispheres(shape: Sequence[int], orientation: str) -> np.ndarray:
    """Hemispheres of a symmetric atlas, as BrainGlobe makes them: the left-right axis split at ``round(n/2)``.

    Args:
        shape: ``(Z, Y, X)`` of the atlas arrays.
        orientation: their orientation code (the axis whose letter is ``l`` or ``r`` is split).

    Returns:
        ``shape`` uint8 array: 1 left, 2 right.
    """
    code = orientation.lower()
    axis = next(i for i, letter in enumerate(code) if letter in "lr")
    origin_side, far_side = (RIGHT, LEFT) if code[axis] == "r" else (LEFT, RIGHT)
    split = round(shape[axis] / 2)
    index = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
    return np.broadcast_to(
        np.where(index < split, origin_side, far_side).astype(np.uint8), tuple(shape)
    ).copy()


def division_map(
    structures: Mapping[int, Structure],
    counts: Mapping[int, int],
    max_divisions: int = 14,
    min_share: float = 0.01,
) -> dict[int, int]:
    """Each present structure id → its ancestor at the atlas's level of major divisions.

    That level is the deepest one of the hierarchy at which at most ``max_divisions`` ancestors each hold
    at least ``min_share`` of the labelled voxels (for the Allen atlas: isocortex, striatum, thalamus,
    hypothalamus, midbrain, pons, medulla, cerebellum, ...). When already the level below the root has more (a
    flat table, as MRI atlases have), every id maps to itself: all structures are drawn, not only the brain's
    outline. Ids unknown to ``structures`` map to themselves; background (0) is not mapped.

    Args:
        structures: id → structure (with its path from the root).
        counts: voxels per present id (e.g. from ``np.unique(labels, return_counts=True)``).
        max_divisions: most divisions of at least ``min_share`` each.
        min_share: share of the labelled voxels a division must hold to count.
    """
    ids = {int(i): int(n) for i, n in counts.items() if int(i) != 0}
    paths = {i: structures[i].path if i in structures and structures[i].path else (i,) for i in ids}
    total = max(sum(ids.values()), 1)
    best = {i: p[0] for i, p in paths.items()}
    for depth in range(1, max((len(p) for p in paths.values()), default=1)):
        candidate = {i: p[min(depth, len(p) - 1)] for i, p in paths.items()}
        sizes: dict[int, int] = {}
        for sid, division in candidate.items():
            sizes[division] = sizes.get(division, 0) + ids[sid]
        if sum(size >= min_share * total for size in sizes.values()) > max_divisions:
            if depth == 1:  # a flat table (an MRI atlas's): no level of divisions, so every structure is drawn
                return {i: i for i in ids}
            break
        best = candidate
    return best


# -- writing the TIFF layout ------------------------------------------------------------------------------------
def write_tiff_atlas(
    folder: str | Path,
    reference: np.ndarray,
    annotation: np.ndarray,
    structures: Sequence[Structure],
    metadata: Mapping[str, Any],
    hemispheres: np.ndarray | None = None,
) -> Path:
    """Write an atlas in BrainGlobe's TIFF layout (``metadata.json``, ``structures.json``/``.csv``, TIFFs).

    The files are written into a hidden sibling folder that is renamed to ``folder`` once they are all there, so
    ``folder`` holds a whole atlas or does not exist.

    Args:
        folder: the atlas folder to create (e.g. ``<dir>/my_atlas_50um_v1.0``); must not exist.
        reference: ``(Z, Y, X)`` uint16 template, in ``metadata["orientation"]``.
        annotation: same shape, uint32 structure ids.
        structures: the structures (their ``path`` is written as ``structure_id_path``).
        metadata: ``name``, ``citation``, ``atlas_link``, ``species``, ``resolution``, ``orientation``,
            ``version``; ``shape`` and ``symmetric`` are set here.
        hemispheres: 1/2 volume; None for a symmetric atlas.

    Returns:
        The folder.
    """
    folder = Path(folder)
    if folder.exists():
        raise InputError(f"atlas folder {folder} already exists: remove it or choose another folder.")
    if reference.shape != annotation.shape or (
        hemispheres is not None and hemispheres.shape != reference.shape
    ):
        raise InputError(
            "reference, annotation and hemispheres must have one shape: give volumes on one grid."
        )
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # a partial folder is what a write that died left
    partial.mkdir(parents=True)
    try:
        _write_tiff_files(partial, reference, annotation, structures, metadata, hemispheres)
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def _write_tiff_files(
    folder: Path,
    reference: np.ndarray,
    annotation: np.ndarray,
    structures: Sequence[Structure],
    metadata: Mapping[str, Any],
    hemispheres: np.ndarray | None,
) -> None:
    """The files of :func:`write_tiff_atlas` in ``folder`` (which exists)."""
    import tifffile

    meta = {**metadata, "shape": [int(s) for s in reference.shape], "symmetric": hemispheres is None}
    meta.setdefault("additional_references", [])
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=4) + "\n")
    items = [
        {
            "acronym": s.acronym,
            "id": s.id,
            "name": s.name,
            "structure_id_path": list(s.path),
            "rgb_triplet": list(s.rgb),
        }
        for s in structures
    ]
    (folder / STRUCTURES_FILE).write_text(json.dumps(items) + "\n")
    with (folder / "structures.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["acronym", "id", "name", "structure_id_path", "parent_structure_id"])
        for s in structures:
            parent = s.path[-2] if len(s.path) > 1 else ""
            writer.writerow([s.acronym, s.id, s.name, "/" + "/".join(str(v) for v in s.path) + "/", parent])
    options = {"compression": "zlib", "compressionargs": {"level": 9}, "metadata": {"axes": "ZYX"}}
    tifffile.imwrite(folder / TIFF_FILES["reference"], reference.astype(np.uint16), predictor=True, **options)
    tifffile.imwrite(folder / TIFF_FILES["annotation"], annotation.astype(np.uint32), **options)
    if hemispheres is not None:
        tifffile.imwrite(folder / TIFF_FILES["hemispheres"], hemispheres.astype(np.uint8), **options)
