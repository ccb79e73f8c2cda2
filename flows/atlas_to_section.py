"""Flow ``atlas-to-section``: align one atlas to every brain or section of a manifest.

Parameters (fixed names): ``atlas`` (a BrainGlobe atlas, by name or folder, or an atlas template image),
``manifest`` (YAML or CSV, see
:mod:`flows.manifest`), ``out`` (output folder); ``config``: the options
(:class:`~flows.config.AtlasToSectionOptions`, inline or a YAML path such as
``configs/flows/atlas_to_section.yaml``). Each item is the fixed image, the atlas the moving one: the
atlas and its labels are warped onto the item. With a BrainGlobe atlas every item also gets what
``patchmorph atlas`` writes (labels, hemispheres and boundaries on the brain, the brain in atlas space, the
inverse field, ``volumes.csv``, the atlas QC figures). One bad item never stops the batch; items whose
outputs exist and match their inputs are skipped. Outputs: ``<out>/<item>/`` per item (see
:mod:`flows.steps`), ``<out>/atlas/`` (the converted atlas), ``<out>/report.md``, ``<out>/report.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State

from flows.config import AtlasToSectionOptions, Geometry, resolve_options
from flows.manifest import ManifestItem, ManifestProblem, load_manifest, prepared_folder_name, where_relative
from flows.records import ItemError, RunReport
from flows.runner import final_state, finish_run, run_on_dask
from flows.settings import project_logs_in_the_run
from flows.steps import ImageInput, ItemJob, conversion_key, item_failed
from flows.tasks import convert_task
from patchmorph_core.errors import InputError
from pipeline.atlas import AUTO, AtlasRange, PreparedAtlas, check_atlas_range, prepare_atlas, range_text
from pipeline.atlas_job import PLACEMENT_FILE, channel_names, check_auto_range, resolve_atlas_range
from pipeline.brainglobe import BrainGlobeAtlas, find_atlas
from pipeline.checks import check_outputs

FLOW_NAME = "atlas-to-section"


def brainglobe_atlas(atlas: str) -> BrainGlobeAtlas | None:
    """The BrainGlobe atlas ``atlas`` names (an installed atlas's name, or a folder holding ``metadata.json``
    or ``manifest.json``), or None when it is the path of an image."""
    path = Path(atlas)
    if path.is_dir() and any((path / name).is_file() for name in ("metadata.json", "manifest.json")):
        return find_atlas(path)
    if not path.exists() and Path(atlas).name == atlas and "." not in atlas:
        return find_atlas(atlas)
    return None


PreparedKey = tuple[str, str]
"""Which cut of the atlas an item needs: its ``brain_geometry`` and its ``atlas_range`` as
:func:`pipeline.atlas.range_text` writes it (empty: the whole atlas)."""


def prepared_key(entry: ManifestItem) -> PreparedKey:
    """The cut of the atlas ``entry`` is registered to (:data:`PreparedKey`)."""
    return entry.brain_geometry, range_text(entry.atlas_range)


def _brain_input(entry: ManifestItem, out: Path) -> ImageInput:
    """An atlas item's brain and its copy ``<out>/<item>/brain.ome.zarr`` (always made: the atlas labels are nested
    inside it)."""
    geometry = Geometry(voxel_size=entry.voxel_size, unit=entry.unit, orientation=entry.orientation)
    return ImageInput(
        path=entry.path, geometry=geometry, converted=out / entry.name / "brain.ome.zarr", always_copy=True,
        channel_index=entry.channel_index,
    )  # fmt: skip


def placed_items(
    atlas: BrainGlobeAtlas, entries: Sequence[ManifestItem | ManifestProblem], out: Path, overwrite: bool = False
) -> tuple[list[ManifestItem | ManifestProblem], dict[str, dict[str, Any]], list[ItemError]]:
    """``entries`` with each ``atlas_range`` :data:`~pipeline.atlas.AUTO` direction found, as ``patchmorph atlas``
    finds it: refused from the brain's header first (:func:`pipeline.atlas_job.check_auto_range`), then the brain is
    converted (into the folder and with the record the convert step reuses) and searched
    (:func:`pipeline.atlas_job.resolve_atlas_range`, whose record in the item's folder a rerun reads back; with
    ``overwrite``, the batch's option that recomputes every item, it searches again).

    Returns:
        The entries (a placed item with its found range; an item that cannot be placed left out), the search's
        record per placed item's name, and one error per item that cannot be placed.
    """
    kept: list[ManifestItem | ManifestProblem] = []
    placements: dict[str, dict[str, Any]] = {}
    errors: list[ItemError] = []
    for entry in entries:
        if isinstance(entry, ManifestProblem) or AUTO not in entry.atlas_range.values():
            kept.append(entry)
            continue
        option = f"manifest item {entry.name!r}: atlas_range"
        brain = _brain_input(entry, out)
        step = "inputs"
        try:
            if not entry.path.exists():
                raise InputError(f"fixed input {entry.path} does not exist: fix the path (or the manifest entry).")
            check_outputs(
                inputs={"fixed": entry.path},
                outputs={"converted fixed": brain.converted, "placement": brain.converted.parent / PLACEMENT_FILE},
            )  # as the steps check them, before this one writes them
            step = "atlas_range"
            opened = {**brain.geometry.model_dump(), "channel_index": entry.channel_index}
            check_auto_range(atlas, entry.path, opened, entry.atlas_range, option=option)
            step = "convert"
            brain.converted.parent.mkdir(parents=True, exist_ok=True)
            key = conversion_key(brain)
            geometry = brain.geometry
            converted = convert_task.fn(
                entry.path, brain.converted, geometry.voxel_size, geometry.unit, geometry.orientation, False, key,
                entry.channel_index,
            )
            step = "atlas_range"
            settings = {"atlas": str(atlas.folder), "brain": key, "atlas_range": range_text(entry.atlas_range)}
            found, placement = resolve_atlas_range(
                atlas, converted, entry.path, entry.atlas_range, brain.converted.parent, settings, option=option,
                search_again=overwrite,
            )
        except Exception as err:  # noqa: BLE001 - one item's failure is its error, the batch goes on
            errors.append(item_failed(entry.name, step, err))
            continue
        kept.append(entry.model_copy(update={"atlas_range": found}))
        placements[entry.name] = placement
    return kept, placements, errors


def _manifest_error(name: str, message: str) -> ItemError:
    """The error record of an item refused from its manifest entry (step ``manifest``), logged as the steps log an
    item's failure (:func:`flows.steps.item_failed`)."""
    return item_failed(name, "manifest", InputError(message))


def atlas_jobs(
    atlas: Path,
    entries: list[ManifestItem | ManifestProblem],
    out: Path,
    options: AtlasToSectionOptions,
    prepared: Mapping[PreparedKey, PreparedAtlas | InputError] | None = None,
    placements: Mapping[str, dict[str, Any]] | None = None,
) -> tuple[list[ItemJob], list[ItemError]]:
    """One job per valid manifest item (sample fixed, atlas moving) and one error per invalid entry.

    With a BrainGlobe atlas ``prepared`` for each brain geometry and atlas range of the manifest
    (:func:`prepared_atlases`) the moving image is the reference prepared for the item's geometry and range and
    every job gets the atlas outputs (its sample is always copied, since the atlas labels are nested inside it); a
    range the atlas refused is the item's error. ``placements``: the search's record of each item whose range was
    found (:func:`placed_items`), for its summary."""
    atlas_dir = out / "atlas"
    image_moving = ImageInput(path=atlas, geometry=options.atlas_geometry, converted=atlas_dir / "atlas.ome.zarr")
    moving_labels = None
    if options.atlas_labels and prepared is None:
        moving_labels = ImageInput(
            path=Path(options.atlas_labels),
            geometry=options.atlas_geometry,
            converted=atlas_dir / "atlas_labels.ome.zarr",
            labels=True,
        )
    jobs: list[ItemJob] = []
    errors: list[ItemError] = []
    for entry in entries:
        if isinstance(entry, ManifestProblem):
            errors.append(_manifest_error(entry.name, entry.message))
            continue
        if prepared is None and entry.brain_geometry != "full":
            message = (
                f"brain_geometry {entry.brain_geometry} needs a BrainGlobe atlas (its hemispheres image): give the "
                "atlas as a BrainGlobe name or folder, or crop the atlas image to the hemisphere."
            )
            errors.append(_manifest_error(entry.name, message))
            continue
        if prepared is None and entry.atlas_range:
            message = (
                f"manifest item {entry.name!r}: atlas_range {range_text(entry.atlas_range)} needs a BrainGlobe atlas "
                "(the range is in its coordinates): give the atlas as a BrainGlobe name or folder, or crop the atlas "
                "image to the range."
            )
            errors.append(_manifest_error(entry.name, message))
            continue
        own = None if prepared is None else prepared[prepared_key(entry)]
        if isinstance(own, InputError):
            errors.append(_manifest_error(entry.name, f"manifest item {entry.name!r}: {own}"))
            continue
        item_dir = out / entry.name
        geometry = Geometry(voxel_size=entry.voxel_size, unit=entry.unit, orientation=entry.orientation)
        fixed_labels = None
        if entry.labels:
            fixed_labels = ImageInput(
                path=entry.labels,
                geometry=geometry,
                converted=item_dir / "sample_labels.ome.zarr",
                labels=True,
            )
        fixed = ImageInput(
            path=entry.path, geometry=geometry, converted=item_dir / "sample.ome.zarr", channel_index=entry.channel_index
        )
        moving, atlas_folder = image_moving, None
        if own is not None:
            fixed = _brain_input(entry, out)
            moving, atlas_folder = ImageInput(path=own.reference, converted=own.reference), own.reference.parent
        channels = {
            name: ImageInput(
                path=c.path, geometry=geometry, converted=item_dir / f"{name}.ome.zarr", channel_index=c.index
            )
            for name, c in channel_names(list(entry.channels)).items()
        }
        jobs.append(
            ItemJob(
                name=entry.name,
                out_dir=item_dir,
                fixed=fixed,
                moving=moving,
                fixed_labels=fixed_labels,
                moving_labels=moving_labels,
                atlas=None if own is None else str(own.atlas.folder),
                atlas_dir=atlas_folder,
                brain_geometry=entry.brain_geometry,
                atlas_range=entry.atlas_range,
                atlas_placement=(placements or {}).get(entry.name, {}),
                channels=channels if own is not None else {},
            )
        )
    return jobs, errors


def prepared_folder(out: Path, key: PreparedKey) -> Path:
    """Where the atlas cut to ``key`` is prepared: ``<out>/atlas`` for whole brains, ``<out>/atlas_<geometry>``
    for a hemisphere, each with ``_<range>`` appended for an atlas range (e.g. ``atlas_ap6200-9200``;
    :func:`flows.manifest.prepared_folder_name`, whose names no item may take)."""
    return out / prepared_folder_name(*key)


def prepared_atlases(
    atlas: BrainGlobeAtlas, entries: Sequence[ManifestItem | ManifestProblem], out: Path
) -> dict[PreparedKey, PreparedAtlas | InputError]:
    """The atlas prepared once for each brain geometry and atlas range of the manifest's items, in
    :func:`prepared_folder` (:func:`pipeline.atlas.prepare_atlas`); a range that
    :func:`pipeline.atlas.check_atlas_range` refuses maps to its refusal (the items' error)."""
    cuts: dict[PreparedKey, AtlasRange] = {("full", ""): {}}
    items = [e for e in entries if isinstance(e, ManifestItem)]
    if items:
        cuts = {prepared_key(e): dict(e.atlas_range) for e in items}
    prepared: dict[PreparedKey, PreparedAtlas | InputError] = {}
    for key, atlas_range in sorted(cuts.items()):
        try:
            check_atlas_range(atlas, atlas_range, option="atlas_range")
        except InputError as err:
            prepared[key] = err
            continue
        prepared[key] = prepare_atlas(atlas, prepared_folder(out, key), key[0], atlas_range)  # type: ignore[arg-type]
    return prepared


@flow(name=FLOW_NAME)
def atlas_to_section(
    atlas: str, manifest: str, out: str, config: AtlasToSectionOptions | str | None = None
) -> RunReport | State:
    """Align ``atlas`` to every item of ``manifest``; write per-item outputs, QC and a report into ``out``.

    Returns:
        The :class:`~flows.records.RunReport` when every item succeeded; else the run ends ``Failed`` with a
        one-sentence message (:func:`flows.runner.final_state`): a direct call raises
        :class:`~flows.runner.BatchFailed` carrying the report, after every other item finished.

    Raises:
        InputError: the atlas, its labels or the manifest cannot be read (nothing to align).
    """
    with project_logs_in_the_run():  # the atlas's and the manifest's warnings too, not only the items'
        options = resolve_options(config, AtlasToSectionOptions)
        found = brainglobe_atlas(atlas)
        for role, path in (("atlas", None if found else atlas), ("atlas_labels", options.atlas_labels)):
            if path is not None and not Path(path).exists():
                raise InputError(
                    f"{role} {path} does not exist{where_relative(path)}: give the path of the atlas image (or fix "
                    "the option)."
                )
        out_dir = Path(out)
        check_outputs(
            inputs={"atlas": atlas, "atlas_labels": options.atlas_labels, "manifest": manifest},
            outputs={"report": out_dir / "report.md", "report record": out_dir / "report.json"},
        )
        entries = load_manifest(manifest)
        placements: dict[str, dict[str, Any]] = {}
        unplaced: list[ItemError] = []
        if found is not None:  # an item's range 'auto' is found before the atlas is cut to it
            entries, placements, unplaced = placed_items(found, entries, out_dir, options.overwrite)
        prepared = None if found is None else prepared_atlases(found, entries, out_dir)
        jobs, errors = atlas_jobs(Path(atlas), entries, out_dir, options, prepared, placements)
        errors = [*unplaced, *errors]
        outcomes = run_on_dask(jobs, options, options.max_parallel_items, errors)
        inputs = {"atlas": atlas, "manifest": manifest}
        return final_state(finish_run(FLOW_NAME, inputs, out_dir, outcomes))
