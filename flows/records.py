"""Typed per-item records of the flows, and the input fingerprint that lets a rerun skip finished items.

Each item's output folder gets a ``done.json`` written LAST, after every output of the item exists: it
holds the item's :class:`ItemResult` and the fingerprint of its inputs (their content identity,
:func:`pipeline.resume.content_identity`) and options. A rerun skips an item whose ``done.json`` fingerprint matches and whose outputs
exist; anything else (no record, other inputs, other options, a missing output) is recomputed, except a
registration that finished from the same inputs and settings (``registration.json``, written when the field is
complete, with the fingerprint of what the field is made from, :meth:`flows.steps.ItemJob.registration_key`): an
item that failed at a later step, or whose channels, labels or QC settings alone changed, keeps its field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.resume import ITEM_RECORD as DONE_FILE
from pipeline.resume import atomic_write_json, content_identity


class ItemResult(BaseModel):
    """The outputs of one finished (or skipped) item.

    Attributes:
        name: item name (its output folder).
        status: ``"done"`` (computed in this run) or ``"skipped"`` (outputs of an earlier run reused).
        out_dir: the item's output folder.
        outputs: output paths by role (``fixed``, ``field``, ``warped``, ``warped_labels``, ...).
        qc: QC figure paths by kind (``overlay``, ``checkerboard``, ``jacobian``, ``uncertainty``).
        metrics: scalar quality metrics (NCC, folding percent, Jacobian range, mean Dice, ...; a length's name
            ends in its unit, e.g. ``inverse_max_error_um``), and the item's own ``register_seconds``.
        seconds: wall time of the group of items it was computed with (a group's items run side by side).
        source: the image the item was made from, as the manifest gives it.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    status: Literal["done", "skipped"] = "done"
    out_dir: Path
    outputs: dict[str, Path] = Field(default_factory=dict)
    qc: dict[str, Path] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0
    source: str = ""


class ItemError(BaseModel):
    """Why one item failed; the rest of the batch went on.

    Attributes:
        name: item name.
        step: the step that failed (``manifest``, ``convert``, ``register``, ``warp``, ``qc``, ``metrics``).
        error_type: exception class name.
        message: the exception's message.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    status: Literal["failed"] = "failed"
    step: str
    error_type: str
    message: str


class Outcomes(BaseModel):
    """The records of a group of items: one result or one error per item."""

    model_config = ConfigDict(extra="forbid")

    results: list[ItemResult] = Field(default_factory=list)
    errors: list[ItemError] = Field(default_factory=list)


class RunReport(Outcomes):
    """Outcome of one flow run (also written as ``report.json`` in the output folder).

    Attributes:
        flow: flow name.
        inputs: the run's main parameters (paths as given).
        out: output folder.
        report: the markdown report file.
        artifacts: keys of the Prefect artifacts published.
    """

    flow: str
    inputs: dict[str, str]
    out: Path
    report: Path | None = None
    artifacts: list[str] = Field(default_factory=list)

    @property
    def n_done(self) -> int:
        """Items computed in this run."""
        return sum(r.status == "done" for r in self.results)

    @property
    def n_skipped(self) -> int:
        """Items whose earlier outputs were reused."""
        return sum(r.status == "skipped" for r in self.results)


def fingerprint(inputs: dict[str, str | Path | None], options: dict[str, Any]) -> str:
    """SHA-256 of the inputs' content identities and the options that shape the outputs.

    Args:
        inputs: input paths by role (None entries are recorded as absent).
        options: JSON-serialisable options (e.g. ``model.model_dump(mode="json")``).
    """
    described = {
        role: (None if value is None else content_identity(value))
        for role, value in sorted(inputs.items())
    }
    text = json.dumps({"inputs": described, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_done(out_dir: Path, result: ItemResult, key: str) -> Path:
    """Write the completion record of an item (atomically, after all its outputs exist), with the content identity
    of its field (:func:`finished_result` checks it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / DONE_FILE
    record: dict[str, Any] = {"fingerprint": key, "result": result.model_dump(mode="json")}
    if "field" in result.outputs:
        record["field"] = content_identity(result.outputs["field"])
    atomic_write_json(path, record)
    return path


def finished_result(out_dir: Path, key: str) -> ItemResult | None:
    """The earlier result of an item when its record matches ``key``, its field is the one it made (a record of
    before the field was recorded: taken as it was) and its outputs still exist."""
    path = out_dir / DONE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        result = ItemResult.model_validate(record["result"])
    except (ValueError, KeyError, TypeError):
        return None
    if record.get("fingerprint") != key:
        return None
    if "field" in record and record["field"] != content_identity(result.outputs.get("field")):
        return None  # registered again since by another run (``patchmorph atlas`` into this folder): its outputs too
    paths = [*result.outputs.values(), *result.qc.values()]
    if not all(Path(p).exists() for p in paths):
        return None
    return result.model_copy(update={"status": "skipped"})


REGISTRATION_FILE = "registration.json"
"""An item's record of its finished registration (written when its field is complete, before its later steps)."""


def record_registration(out_dir: Path, key: str, field: Path, record: Any) -> None:
    """Keep what an item's finished registration gave (``record``, :class:`pipeline.register.RegistrationRecord`)
    with ``key`` (the fingerprint of what the field is made from) and the field's identity, so that a rerun of an item
    that failed at a later step, or whose other settings alone changed, reuses the field instead of registering again
    (hours on a terabyte brain)."""
    atomic_write_json(
        out_dir / REGISTRATION_FILE,
        {"fingerprint": key, "field": content_identity(field), "record": record.model_dump(mode="json")},
    )


def reusable_registration(out_dir: Path, key: str, field: Path) -> Any:
    """The :class:`pipeline.register.RegistrationRecord` of an earlier run of this item when it was made with the
    same fingerprint and the field is still the complete one it wrote (no run folder beside it), else None."""
    from pipeline.register import RegistrationRecord

    path = out_dir / REGISTRATION_FILE
    if not path.is_file() or field.with_name(field.name + ".run").exists():
        return None
    try:
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") != key or stored.get("field") != content_identity(field):
            return None
        return RegistrationRecord.model_validate(stored["record"])
    except (ValueError, KeyError, TypeError, OSError):
        return None
