"""Parameters of the flows (pydantic v2, ``extra="forbid"``), mirrored by the YAML files in ``configs/flows/``.

A flow takes its required inputs as plain parameters (``fixed``/``moving``/``out``,
``atlas``/``manifest``/``out``) and everything else as one options model, given either inline or as the
path of a YAML file (:func:`resolve_options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from patchmorph_core.config import InferenceConfig, load_yaml, resolve_device
from patchmorph_core.errors import InputError
from patchmorph_core.spatial import check_spacing, orientation_matrix, unit_scale
from patchmorph_core.warping import LabelInterpolation
from pipeline.checks import CheckOptions
from pipeline.cluster import ClusterConfig, load_cluster_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The repository's ``configs/`` folder (default YAML files of the flows and the cluster)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Geometry(_Strict):
    """Voxel size, unit and orientation of an input whose file does not carry them (TIFF), or overrides.

    None keeps what the file says (TIFF without a unit: micrometer).
    """

    voxel_size: tuple[float, float, float] | None = None
    unit: str | None = None
    orientation: str | None = None

    @field_validator("voxel_size")
    @classmethod
    def _positive(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None:
            check_spacing(value)
        return value

    @field_validator("unit")
    @classmethod
    def _known_unit(cls, value: str | None) -> str | None:
        if value is not None:
            unit_scale(value, value)
        return value

    @field_validator("orientation")
    @classmethod
    def _known_orientation(cls, value: str | None) -> str | None:
        if value is not None:
            orientation_matrix(value)
            return value.lower()
        return value


class StepOptions(_Strict):
    """Settings shared by the registration flows.

    Attributes:
        inference: the registration settings (model weights, patches, seed, device, field spacing).
        chunk_size: field chunk edge (voxels) of the chunked registration (None: one chunk per task).
        register_cluster: cluster YAML (or scheduler address) that one registration task uses for its
            chunks (default ``configs/flows/task_cluster.yaml``: threads inside the task's own worker
            process, because the flow's workers run the tasks themselves).
        register_workers: worker override for that cluster (None: as in the YAML).
        cluster: where the flow's tasks run: a :class:`pipeline.cluster.ClusterConfig` inline, or the
            path of its YAML file (``configs/cluster/local.yaml``, ``configs/cluster/slurm.yaml``).
        retries: retries of a task that failed on a transient error (I/O, lost worker).
        retry_delay_seconds: wait before a retry.
        overwrite: recompute items whose outputs already exist and match their inputs.
        qc: write the QC figures.
        label_interpolation: how label maps are warped (an item's moving labels, the atlas's labels on every
            item; :func:`pipeline.warp.warp_files`): ``vote``, the label of largest summed trilinear weight
            among a point's 8 neighbours (ANTs' ``GenericLabel``), or ``nearest``, the nearest voxel's label.
        checks: what the pre-flight and quality checks of a registration may let through
            (:class:`pipeline.checks.CheckOptions`; all False: refuse, as on the command line).
    """

    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    chunk_size: int | None = Field(None, ge=8)
    register_cluster: str = str(CONFIG_DIR / "flows" / "task_cluster.yaml")
    register_workers: int | None = Field(None, ge=1)
    cluster: ClusterConfig | str = Field(default_factory=ClusterConfig)
    retries: int = Field(2, ge=0)
    retry_delay_seconds: float = Field(5.0, ge=0.0)
    overwrite: bool = False
    qc: bool = True
    label_interpolation: LabelInterpolation = "vote"
    checks: CheckOptions = Field(default_factory=CheckOptions)


class RegisterPairOptions(StepOptions):
    """Options of the register-pair flow (``configs/flows/register_pair.yaml``).

    Attributes:
        fixed_geometry: geometry of ``fixed`` when its file does not carry one.
        moving_geometry: geometry of ``moving`` when its file does not carry one.
        fixed_labels: label map on the fixed image (scored against the warped moving labels by Dice).
        moving_labels: label map on the moving image (warped by ``label_interpolation``).
    """

    fixed_geometry: Geometry = Field(default_factory=Geometry)
    moving_geometry: Geometry = Field(default_factory=Geometry)
    fixed_labels: str | None = None
    moving_labels: str | None = None


class AtlasToSectionOptions(StepOptions):
    """Options of the atlas-to-section flow (``configs/flows/atlas_to_section.yaml``).

    Attributes:
        atlas_labels: the atlas annotation (label map on the atlas template), warped onto every item.
        atlas_geometry: geometry of the atlas when its file does not carry one.
        max_parallel_items: items in flight at once (a bound on memory and disk use).
    """

    atlas_labels: str | None = None
    atlas_geometry: Geometry = Field(default_factory=Geometry)
    max_parallel_items: int = Field(2, ge=1)


OptionsT = TypeVar("OptionsT", bound=BaseModel)


_PATH_FIELDS = ("register_cluster", "cluster", "atlas_labels", "fixed_labels", "moving_labels")


def _anchored(options: OptionsT, base: Path) -> OptionsT:
    """``options`` with its relative file paths taken relative to ``base`` (the YAML file's folder)."""
    update: dict[str, object] = {}
    for name in _PATH_FIELDS:
        value = getattr(options, name, None)
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            update[name] = str(base / value)
    inference = getattr(options, "inference", None)
    if (
        isinstance(inference, InferenceConfig)
        and inference.weights
        and not Path(inference.weights).is_absolute()
    ):
        update["inference"] = inference.model_copy(update={"weights": str(base / inference.weights)})
    return options.model_copy(update=update)


def resolve_options(value: OptionsT | str | Path | None, cls: type[OptionsT]) -> OptionsT:
    """The options of a flow run: the model itself, the YAML file it names, or the defaults (None).

    Relative paths inside a YAML file (cluster files, label maps, weights) are relative to that file's
    folder, so a config works from any working directory.

    Raises:
        InputError: the YAML file is missing or holds an unknown key or invalid value.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    path = Path(value)
    options = _anchored(load_yaml(path, cls), path.resolve().parent)
    for name in _PATH_FIELDS:
        given = getattr(options, name, None)
        if isinstance(given, str) and "://" not in given and not Path(given).exists():
            raise InputError(
                f"options file {path}: its {name!r} names {given}, which does not exist (a relative path is taken "
                "from the options file's folder): give an absolute path, or copy that file beside the options file."
            )
    return options


def cluster_config(options: StepOptions) -> ClusterConfig:
    """The flow's Dask cluster settings (loads the YAML file when ``options.cluster`` is a path).

    A local cluster's dashboard given as a bare port (``":0"``, ``":8787"``) is bound to 127.0.0.1, so
    a laptop run listens on the loopback interface only.

    Raises:
        InputError: a local cluster without worker processes (``processes: false``), or one on a machine without
            the GPU that ``inference.device: cuda`` asks for (refused once, before any item is converted).
    """
    config = (
        options.cluster
        if isinstance(options.cluster, ClusterConfig)
        else load_cluster_config(options.cluster)
    )
    if config.kind == "local" and not config.processes:
        raise InputError(
            "the flows' local Dask cluster needs worker processes (each task runs its own Dask work, which "
            "would deadlock on a threads-only cluster in the flow's process): set cluster.processes: true."
        )
    if config.kind in ("local", "threads"):
        resolve_device(options.inference.device)
    if config.kind == "local" and config.dashboard_address.startswith(":"):
        config = config.model_copy(update={"dashboard_address": "127.0.0.1" + config.dashboard_address})
    return config
