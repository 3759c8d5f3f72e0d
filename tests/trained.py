"""A tiny composer trained for real on a small shapes benchmark (Ray Train, 2 workers):
what test_train checks learns, and what the serving tests index and serve."""
from __future__ import annotations

from pathlib import Path

from cir.config import load_config
from cir.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHAPES_MODEL = {"vision": "cir-shapes", "llm": "builtin:tiny-bert"}


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    pairs = [("run.storage", str(Path(tmp_path) / "runs")),
             ("stages", [{"name": "finetune",
                          "data": {"source": "benchmark", "split": "train", "limit": 256,
                                   "benchmark_dir": str(Path(tmp_path) / "bench")},
                          "optim": {"lr": 1e-3, "warmup_steps": 2, "epochs": 1, "micro_batch_size": 16},
                          "loss": {"objective": "infonce"}}])]
    pairs += [(k.replace("__", "."), v) for k, v in overrides.items()]
    cfg = load_config(TrainConfig, REPO / "configs" / "train" / "tiny_test.yaml", pairs)
    cfg.validate()
    return cfg


def four_step_config(tmp_path, benchmark: Path) -> TrainConfig:
    """4 DeepSpeed steps on 128 examples, one thread a worker, with an evaluation at the
    last step: test_train checks its export, test_multinode trains it on two nodes."""
    return tiny_config(tmp_path, run__eval_every=4, run__eval_limit=60, run__torch_threads=1, **{"stages": [{
        "name": "finetune", "data": {"source": "benchmark", "limit": 128, "benchmark_dir": str(benchmark)},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "micro_batch_size": 16, "max_steps": 4}}]})


def shapes_training_config(tmp_path, benchmark: Path) -> TrainConfig:
    """8 epochs of InfoNCE on the benchmark's train split: enough to learn the edits (val
    recall@10 65% against 5% untrained; 12 epochs give 75% for 30 s more)."""
    return tiny_config(tmp_path, model=SHAPES_MODEL, run__eval_every=0, run__checkpoint_every=1000,
                       **{"stages": [{"name": "finetune",
                                      "data": {"source": "benchmark", "benchmark_dir": str(benchmark)},
                                      "optim": {"lr": 2e-3, "warmup_steps": 5, "epochs": 8,
                                                "micro_batch_size": 16},
                                      "loss": {"objective": "infonce"}}]})


def assert_each_step_once(order: dict, total_steps: int, workers: int) -> None:
    """A stage's `data_order.json`: every rank took steps 1..total_steps once each, on
    rows of its own (no two ranks' steps the same)."""
    assert sorted(order["steps"]) == [str(rank) for rank in range(workers)], order["steps"].keys()
    for rank, steps in order["steps"].items():
        assert [step for step, _ in steps] == list(range(1, total_steps + 1)), f"rank {rank} lost or repeated steps"
    assert len({digest for steps in order["steps"].values() for _, digest in steps}) == total_steps * workers
