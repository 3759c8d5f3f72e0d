"""jobs/train.py's machinery under local Ray: 2-worker DeepSpeed ZeRO-2 on CPU (gloo),
resume after a forced failure (with the run on a bucket), export, and a short training
that learns."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cir.config import load_config
from cir.train.config import TrainConfig
from trained import REPO, SHAPES_MODEL, assert_each_step_once, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow


def _history_steps(stage_dir) -> list[int]:
    return [h["step"] for h in json.loads((stage_dir / "history.json").read_text()) if "loss" in h]


def test_deepspeed_zero2_resumes_after_a_failure_without_lost_or_repeated_steps(
        ray_session, s3_uri, tmp_path, small_benchmark, monkeypatch):
    """On a bucket (`run.storage` an S3 URI, the session's moto server): Ray Train's
    checkpoints, the exports, history, curve and feature cache go there; the failed stage
    resumes from its checkpoint there; the chained stage starts from the first stage's
    export there; the export loads back from the URI; nothing touches the local disk."""
    import torch

    from cir.models.export import load_composer
    from cir.storage import Location, local_copy
    from cir.train.run import TrainingStopped, run_folder, run_training

    monkeypatch.chdir(tmp_path)                  # a fallback to the local disk would write here
    monkeypatch.setenv("CIR_CACHE_DIR", str(tmp_path / "cache"))
    bench = str(small_benchmark)
    optim = {"lr": 1e-3, "warmup_steps": 2, "micro_batch_size": 16}
    # Both stages on the same 256 images (their features are encoded once) and no evaluation
    # (its split would be encoded too): what is checked is storage, resume and chaining.
    cfg = tiny_config(tmp_path, run__storage=s3_uri, run__fail_at_step=6, run__checkpoint_every=4,
                      run__report_every=2, run__max_failures=0, run__eval_every=0, **{"stages": [
                          {"name": "first", "data": {"source": "benchmark", "limit": 256, "benchmark_dir": bench},
                           "optim": {**optim, "warmup_steps": 1, "max_steps": 2}},
                          {"name": "finetune", "data": {"source": "benchmark", "limit": 256, "benchmark_dir": bench},
                           "optim": optim}]})
    run = run_folder(cfg)
    assert isinstance(run, Location)
    with pytest.raises(TrainingStopped, match=r"'finetune' failed .*rank \d: RuntimeError: fail_at_step=6: "
                       r"simulated worker failure.*step 4 of 8.*resumes from checkpoint step 4"):
        run_training(cfg)                        # "first" finishes; "finetune" fails after its step-4 checkpoint
    first, stage_dir = run / "first", run / "finetune"
    assert (first / "export" / "config.json").is_file()
    assert not (stage_dir / "export").exists()  # nothing that looks finished
    assert (run.parent / "features").is_dir()    # the feature cache, beside the runs
    # Same name again: resumes from the step-4 checkpoint and finishes (8 steps of 2 x 16).
    export = run_training(cfg)
    assert export == stage_dir / "export"
    assert _history_steps(first) == [2] and _history_steps(stage_dir) == [2, 4, 6, 8]
    order = json.loads((stage_dir / "data_order.json").read_text())
    assert order["restored_from"] == [4]
    assert_each_step_once(order, 8, workers=2)
    assert (export / "model.safetensors").is_file() and (stage_dir / "curve.png").is_file()
    assert json.loads((stage_dir / "settings.json").read_text())["init_from"] == str(first / "export")
    assert not list(tmp_path.iterdir()), "a run wrote to the local disk"
    # A third run finds the export and does nothing.
    assert run_training(cfg) == export
    model = load_composer(str(export))           # from the URI, through the local cache
    local = local_copy(export)
    assert local.parent == tmp_path / "cache" / "remote" and local_copy(export) == local  # one copy
    reference = load_composer(local).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_the_export_is_the_model_as_trained(four_step_export, small_benchmark):
    """Reloaded here, the export retrieves as the trained model did in its worker at the
    last step (the engine's flat ZeRO-2 buffers are cloned out), and it is not the
    untrained model."""
    import torch

    from cir.models.composer import build_composer
    from cir.models.export import load_composer
    from cir.train.loop import evaluate_recall
    from cir.train.run import build_val, features_folder, run_folder

    export, cfg = four_step_export
    final = json.loads((run_folder(cfg) / "finetune" / "history.json").read_text())[-1]
    assert final["step"] == 4 and "val_target_cos" in final
    val = build_val(str(small_benchmark), cfg.model.vision, "val", 60, features_folder(cfg))  # the run's
    reloaded = evaluate_recall(load_composer(export), val)
    assert reloaded["val_target_cos"] == pytest.approx(final["val_target_cos"], abs=1e-5)
    for k in (1, 5, 10):  # at most one query flips on a tie computed in another process
        assert abs(reloaded[f"val_recall@{k}"] - final[f"val_recall@{k}"]) <= 100 / 60 + 1e-9
    torch.manual_seed(cfg.stages[0].data.seed)  # the worker's init, before any step
    untrained = build_composer(cfg.model).state_dict()
    moved = {k: (v - untrained[k]).abs().max().item() for k, v in load_composer(export).state_dict().items()}
    assert max(moved.values()) > 1e-3 and moved["visual.conv1.weight"] == 0  # trained; the tower frozen


def test_short_training_learns(ray_session, trained_shapes_export, small_benchmark):
    """Recall@10 on the val split far above the untrained composer's."""
    import torch

    from cir.models.composer import ComposerConfig, build_composer
    from cir.models.export import load_composer
    from cir.train.loop import evaluate_recall
    from cir.train.run import build_val, features_folder

    export, cfg = trained_shapes_export
    val = build_val(str(small_benchmark), "cir-shapes", "val", 60, features_folder(cfg))
    torch.manual_seed(0)
    untrained = evaluate_recall(build_composer(ComposerConfig(**SHAPES_MODEL)), val)
    trained = evaluate_recall(load_composer(export), val)
    assert trained["val_recall@10"] >= max(3 * untrained["val_recall@10"], untrained["val_recall@10"] + 20), \
        (untrained, trained)


def test_a_run_name_is_tied_to_its_settings(tmp_path):
    from cir.train.run import claim_stage, stage_settings

    cfg = tiny_config(tmp_path)
    stage, stage_dir = cfg.stages[0], tmp_path / "runs" / "r" / "finetune"
    claim_stage(stage_dir, stage_settings(cfg, stage, None))
    claim_stage(stage_dir, stage_settings(cfg, stage, None))  # same settings: resumes
    cfg.run.fail_at_step = 3  # run-time settings do not change what was trained
    claim_stage(stage_dir, stage_settings(cfg, stage, None))
    stage.optim.lr = 2e-3
    with pytest.raises(ValueError, match=r"other settings \(stage differ\).*--name"):
        claim_stage(stage_dir, stage_settings(cfg, stage, None))
    with pytest.raises(ValueError, match=r"init_from, stage differ"):
        claim_stage(stage_dir, stage_settings(cfg, stage, tmp_path / "pretrain" / "export"))
    assert [p.name for p in stage_dir.iterdir()] == ["settings.json"]


def test_train_job_refuses_a_run_name_trained_with_other_settings(tmp_path, capsys):
    """Before Ray starts, with the job's own error format, not a traceback from a worker."""
    from cir.train.run import claim_stage, check_run_settings, stage_settings
    from conftest import load_job

    job = load_job("train")
    yaml = REPO / "configs" / "train" / "tiny_test.yaml"
    cfg = load_config(TrainConfig, yaml, [("run.storage", str(tmp_path / "runs"))])
    check_run_settings(cfg)  # a new name: nothing to compare
    stage = cfg.stages[-1]
    earlier = Path(cfg.run.storage).resolve() / cfg.run.name / cfg.stages[-2].name if len(cfg.stages) > 1 else None
    stage.optim.lr *= 2
    claim_stage(Path(cfg.run.storage).resolve() / cfg.run.name / stage.name,
                stage_settings(cfg, stage, earlier / "export" if earlier else None))
    assert job.main(["--config", str(yaml), "--storage", str(tmp_path / "runs")]) == 2
    assert "was trained with other settings (stage differ)" in capsys.readouterr().err
