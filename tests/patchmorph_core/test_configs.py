"""Every committed training and registration YAML in configs/ is a valid config (one-to-one with its class)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from patchmorph_core.config import InferenceConfig, TrainConfig, load_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("train_*.yaml")), ids=lambda p: p.name)
def test_training_configs_load(path: Path) -> None:
    config = load_yaml(path, TrainConfig)
    assert config.steps > 0 and config.data.images  # a real recipe, not an empty file


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("register_*.yaml")), ids=lambda p: p.name)
def test_registration_configs_load(path: Path) -> None:
    load_yaml(path, InferenceConfig)


def test_the_default_model_recipe_chains_its_steps() -> None:
    """Each fine-tuning step starts from the previous step's checkpoint (the recipe in WEIGHTS.md)."""
    steps = ["train_default.yaml", "train_affine.yaml", "train_less_smooth.yaml", "train_cosine.yaml"]
    configs = [load_yaml(CONFIGS / name, TrainConfig) for name in steps]
    assert configs[0].init_weights is None
    for previous, current in pairwise(configs):
        assert current.init_weights is not None
        assert Path(current.init_weights).name == Path(previous.checkpoint).name
    assert configs[2].loss.smooth_weight == 0.5 * configs[1].loss.smooth_weight
    assert [c.lr_schedule for c in configs] == ["constant", "constant", "constant", "cosine"]
    assert configs[3].loss == configs[2].loss and configs[3].lr == configs[2].lr  # only the schedule changes
    contrast = load_yaml(CONFIGS / "train_contrast.yaml", TrainConfig)  # step 5 fine-tunes step 4
    assert contrast.init_weights is not None and Path(contrast.init_weights).name == Path(configs[3].checkpoint).name
    assert contrast.data.independent_contrast > 0 and contrast.loss.similarity == "mind"
    per_pair = load_yaml(CONFIGS / "train_contrast_per_pair.yaml", TrainConfig)  # step 7 fine-tunes step 6
    assert per_pair.init_weights is not None and Path(per_pair.init_weights).name == "patchmorph_step6.pt"
    assert per_pair.data == contrast.data and per_pair.lr_schedule == "cosine"
    assert per_pair.loss.similarity == "ncc" and per_pair.loss.cross_contrast_similarity == "mind"
    assert per_pair.loss.cross_contrast_weight == contrast.loss.similarity_weight
