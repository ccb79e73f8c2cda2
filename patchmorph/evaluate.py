"""``patchmorph evaluate``: :func:`pipeline.evaluate.evaluate_files` and its table."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from patchmorph.app import command


@command
def evaluate(
    labels_a: Path | None = typer.Option(
        None, "--labels-a", help="Label map, e.g. the fixed image's labels."
    ),
    labels_b: Path | None = typer.Option(None, "--labels-b", help="Label map on the same grid (warped)."),
    label_set: str = typer.Option(
        "all",
        "--label-set",
        help="'all' (every label present), 'standard' (28 FreeSurfer structures) or 2,3,17.",
    ),
    field: Path | None = typer.Option(None, "--field", help="Displacement field (register output)."),
    mask: Path | None = typer.Option(None, "--mask", help="Label map: count folds where it is > 0."),
    image_a: Path | None = typer.Option(None, "--image-a", help="Image, e.g. the fixed image."),
    image_b: Path | None = typer.Option(None, "--image-b", help="Image on the same grid (warped)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the metrics as JSON here."),
) -> None:
    """Dice per label of two label maps, % folded voxels (det J <= 0) of a field, NCC of two images."""
    from pipeline.checks import check_outputs
    from pipeline.evaluate import evaluate_files, format_table, parse_label_set

    if out is not None:
        inputs = {"--labels-a": labels_a, "--labels-b": labels_b, "--field": field, "--mask": mask}
        check_outputs(inputs={**inputs, "--image-a": image_a, "--image-b": image_b}, outputs={"--out": out})
    result = evaluate_files(
        labels_a=labels_a,
        labels_b=labels_b,
        label_set=parse_label_set(label_set),
        field=field,
        mask=mask,
        image_a=image_a,
        image_b=image_b,
    )
    typer.echo(format_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        typer.echo(f"wrote {out}")
