"""Typed configs: YAML + overrides, unknown keys and ill-typed values refused, stages by name."""
from __future__ import annotations

import pytest

from cir.config import load_config, parse_override
from cir.train.config import TrainConfig
from conftest import REPO

B = REPO / "configs" / "train" / "shapes_B.yaml"


def test_a_stage_field_is_set_by_the_stage_name():
    cfg = load_config(TrainConfig, B, [parse_override("stages.finetune.data.seed=2"),
                                       parse_override("stages.pretrain.optim.lr=0.01")])
    pretrain, finetune = cfg.stages
    assert (pretrain.data.seed, finetune.data.seed) == (0, 2)
    assert (pretrain.optim.lr, finetune.optim.lr) == (0.01, 0.0003)
    assert finetune.loss.objective == "ptha" and cfg.model.vision == "cir-shapes"  # typed sections


@pytest.mark.parametrize("override, message", [
    ("stages.warmup.optim.lr=1", "no item named 'warmup' \\(named: pretrain, finetune\\)"),
    ("stages.finetune=1", "set a field of an item"),
    ("stages.finetune.optim.lr=fast", "expected float"),
    ("stages.finetune.optim.speed=1", "unknown key\\(s\\) speed"),
    ("model.vison=cir-tiny", "unknown key\\(s\\) vison"),
    ("stages.finetune.loss.objective=magic", "unknown objective 'magic'"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_config(TrainConfig, B, [parse_override(override)])


def _config_class(path):
    from cir.evaluation.config import EvalConfig
    from cir.evaluation.scaling import ScalingConfig
    from cir.synth.config import SynthConfig
    from cir.train.generator_config import GeneratorTrainConfig

    if path.parent.name == "train":
        return GeneratorTrainConfig if "generator" in path.stem or "captioner" in path.stem else TrainConfig
    return {"synth": SynthConfig, "eval": EvalConfig, "scaling": ScalingConfig}.get(path.parent.name, SynthConfig)


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    # Unknown keys and ill-typed values are refused by the loader; what needs files
    # that a run writes first (a synth output, an export) is checked when a job starts.
    assert load_config(_config_class(path), path) is not None
