"""Flow options: the YAML files in configs/flows map one-to-one onto the models; SLURM from the same config."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import AtlasToSectionOptions, RegisterPairOptions, cluster_config, resolve_options
from patchmorph_core.errors import InputError
from pipeline.cluster import ClusterConfig, job_script

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("atlas_to_section.yaml", AtlasToSectionOptions),
        ("allen_ccf_100um.yaml", AtlasToSectionOptions),
        ("register_pair.yaml", RegisterPairOptions),
    ],
)
def test_yaml_files_load_and_anchor_relative_paths(name: str, cls: type) -> None:
    options = resolve_options(CONFIGS / "flows" / name, cls)
    assert Path(options.register_cluster) == CONFIGS / "flows" / "task_cluster.yaml"
    config = cluster_config(options)
    assert config.kind == "local" and config.dashboard_address.startswith("127.0.0.1:")
    # every key of the model appears in the YAML (the file documents all options)
    text = (CONFIGS / "flows" / name).read_text()
    assert all(f"{key}:" in text for key in cls.model_fields)


def test_allen_example_paths_exist() -> None:
    options = resolve_options(CONFIGS / "flows" / "allen_ccf_100um.yaml", AtlasToSectionOptions)
    assert Path(options.atlas_labels).is_file()
    assert options.atlas_geometry.orientation == "rsa"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "options.yaml"
    bad.write_text("max_parallel_itemz: 3\n")
    with pytest.raises(InputError, match=r"options.yaml.*max_parallel_itemz"):
        resolve_options(bad, AtlasToSectionOptions)


def test_a_copied_options_file_names_the_path_it_lost(tmp_path: Path) -> None:
    """The shipped options file copied elsewhere: its relative cluster path no longer exists, and the refusal names
    the key and the file (before any work), not only the missing path."""
    copy = tmp_path / "atlas_to_section.yaml"
    copy.write_text((CONFIGS / "flows" / "atlas_to_section.yaml").read_text())
    with pytest.raises(InputError, match=r"options file .*atlas_to_section.yaml: its '(register_)?cluster' names .*does not exist"):
        resolve_options(copy, AtlasToSectionOptions)


def test_a_gpu_the_machine_lacks_is_refused_once_before_any_item(tmp_path: Path) -> None:
    """device: cuda with the flow's tasks on this machine (a local cluster) and no GPU: the run's cluster settings
    refuse it, before any item is converted; on a SLURM cluster the nodes decide."""
    import torch

    from patchmorph_core.config import InferenceConfig

    options = RegisterPairOptions(inference=InferenceConfig(device="cuda"))
    if torch.cuda.is_available():
        assert cluster_config(options).kind == "local"
    else:
        with pytest.raises(InputError, match="no CUDA GPU is available"):
            cluster_config(options)
    slurm = options.model_copy(update={"cluster": str(CONFIGS / "cluster" / "slurm.yaml")})
    assert cluster_config(slurm).kind == "slurm"


def test_defaults_and_inline_models() -> None:
    default = resolve_options(None, RegisterPairOptions)
    assert default.retries == 2 and default.cluster == ClusterConfig()
    inline = AtlasToSectionOptions(max_parallel_items=5)
    assert resolve_options(inline, AtlasToSectionOptions) is inline


def test_slurm_job_script_from_flow_options() -> None:
    options = AtlasToSectionOptions(cluster=str(CONFIGS / "cluster" / "slurm.yaml"))
    config = cluster_config(options)
    assert config.kind == "slurm"
    script = job_script(config)
    assert script.startswith("#!")
    assert f"#SBATCH --cpus-per-task={config.slurm.cores}" in script
    assert f"#SBATCH -t {config.slurm.walltime}" in script
    assert "-m distributed.cli.dask_worker" in script and f"--nthreads {config.slurm.cores}" in script


def test_threads_only_local_cluster_is_refused() -> None:
    options = AtlasToSectionOptions(cluster=ClusterConfig(kind="local", processes=False))
    with pytest.raises(InputError, match="processes"):
        cluster_config(options)
