"""Run reports: a markdown table of per-item metrics and the QC images, as files and as Prefect artifacts.

Files go next to the outputs (``<out>/report.md``, ``<out>/report.json``); the Prefect artifacts are
the same markdown: the table, and per item links to its QC figures as ``file://`` URIs (the images stay
files beside the outputs; the API's database never holds image data).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from flows.records import ItemError, ItemResult
from pipeline.resume import atomic_write

logger = logging.getLogger(__name__)

QC_ORDER = ("overlay", "checkerboard", "jacobian", "uncertainty")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from free text.

    Keys longer than 100 characters, or changed by the mapping to the allowed characters (``A_b`` and
    ``a.b`` would both become ``a-b``), end with a hash of the text, so distinct texts keep distinct keys.
    """
    text = "-".join(parts)
    key = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if key != text or len(key) > 100:
        key = f"{key[:91].rstrip('-')}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return key


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def metrics_table(results: Sequence[ItemResult], errors: Sequence[ItemError]) -> str:
    """Markdown table: one row per item (its source image, status, every metric, the wall time of the group it
    ran in), failed items with their error."""
    names = sorted({key for r in results for key in r.metrics})
    header = ["item", "source", "status", *names, "group wall s", "error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [r.name, r.source, r.status, *(_cell(r.metrics.get(k, "")) for k in names), _cell(r.seconds), ""]
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    for e in errors:
        row = [e.name, "", f"failed ({e.step})", *([""] * len(names)), "", f"{e.error_type}: {e.message}"]
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def qc_markdown(result: ItemResult, absolute: bool = True) -> str:
    """Markdown of one item's QC figures as links to their files: ``file://`` URIs (``absolute``, for the
    Prefect UI) or the paths as they are in ``result`` (relative ones, for ``report.md`` beside them)."""
    parts = [f"## {result.name}\n"]
    for kind in sorted(result.qc, key=lambda k: QC_ORDER.index(k) if k in QC_ORDER else len(QC_ORDER)):
        path = Path(result.qc[kind])
        target = path.resolve().as_uri() if absolute else path.as_posix()
        parts.append(f"**{kind}** (`{path}`)\n\n![{kind}]({target})\n")
    return "\n".join(parts)


def write_report(out: Path, title: str, results: Sequence[ItemResult], errors: Sequence[ItemError]) -> Path:
    """Write ``<out>/report.md``: the metrics table and links to every item's QC figures."""
    text = [f"# {title}\n", metrics_table(results, errors)]
    text += [qc_markdown(r.model_copy(update={"qc": _relative(r.qc, out)}), absolute=False) for r in results]
    path = out / "report.md"
    atomic_write(path, lambda handle: handle.write("\n".join(text).encode()))
    return path


def _relative(figures: dict[str, Path], root: Path) -> dict[str, Path]:
    out = {}
    for kind, path in figures.items():
        try:
            out[kind] = Path(path).resolve().relative_to(root.resolve())
        except ValueError:
            out[kind] = Path(path)
    return out


def publish(flow_name: str, results: Sequence[ItemResult], errors: Sequence[ItemError]) -> list[str]:
    """Create the Prefect artifacts of a run: the metrics table and one QC artifact per computed item.

    Returns:
        The artifact keys.
    """
    keys = [artifact_key(flow_name, "metrics")]
    create_markdown_artifact(
        key=keys[0], markdown=metrics_table(results, errors), description=f"{flow_name}: per-item metrics"
    )
    for result in results:
        if result.status != "done" or not result.qc:
            continue
        key = artifact_key(flow_name, "qc", result.name)
        create_markdown_artifact(key=key, markdown=qc_markdown(result), description=f"QC of {result.name}")
        keys.append(key)
    logger.info("published artifacts %s", ", ".join(keys))
    return keys
