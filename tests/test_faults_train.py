"""Training under faults: one Ray Train worker SIGKILLed mid-epoch, after a checkpoint.

With `run.max_failures: 1` Ray Train restores the stage from that checkpoint and it
finishes; with 0 the job stops saying which checkpoint a rerun resumes from, and the
rerun does. Either way each optimizer step is taken once, on the same rows in the same
order as in an undisturbed run (each rank's `data_order.json`), and the export is the
undisturbed run's model, bit for bit (the loop restores each rank's dropout state)."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import asdict

import pytest
import yaml

from trained import assert_each_step_once, tiny_config

# 48 steps of ~0.05 s: the killer has the ~40 steps after the first checkpoint to act in.
# Checkpoints at steps 5, 10, 15, ...: the kill lands mid-epoch.
STEPS_PER_EPOCH, EPOCHS, CHECKPOINT_EVERY, MICRO_BATCH = 4, 12, 5, 8
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS


def fault_config(storage, bench, name: str, max_failures: int):
    """2 workers on the plain torch engine (DeepSpeed's failure path is
    test_train's), 48 steps of 2 x 8 examples; one storage for all runs, so that the
    feature cache (~128 images) is built once."""
    return tiny_config(storage, run__name=name, run__max_failures=max_failures, run__eval_every=0,
                       run__checkpoint_every=CHECKPOINT_EVERY, run__report_every=CHECKPOINT_EVERY,
                       deepspeed__enabled=False, **{"stages": [{
                           "name": "finetune",
                           "data": {"source": "benchmark", "limit": STEPS_PER_EPOCH * 2 * MICRO_BATCH,
                                    "benchmark_dir": str(bench)},
                           "optim": {"lr": 1e-3, "warmup_steps": 2, "epochs": EPOCHS,
                                     "micro_batch_size": MICRO_BATCH}}]})


@pytest.fixture(scope="module")
def fault_storage(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def undisturbed(ray_session, small_benchmark, fault_storage):
    """(stage folder, export) of the run the faulted ones must equal."""
    from cir.train.run import run_folder, run_training

    cfg = fault_config(fault_storage, small_benchmark, "undisturbed", 0)
    export = run_training(cfg)
    return run_folder(cfg) / "finetune", export


class WorkerKiller:
    """A thread that SIGKILLs one live Ray Train worker (found through Ray's state API)
    once the stage has a registered checkpoint at `after_step` or later."""

    def __init__(self, cfg, after_step: int):
        self.cfg, self.after_step = cfg, after_step
        self.killed_pid = self.at_checkpoint = self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    def _checkpoint(self) -> int | None:
        """The stage's latest registered checkpoint step, when at `after_step` or later."""
        from cir.train.run import latest_checkpoint_step

        try:
            step = latest_checkpoint_step(self.cfg, self.cfg.stages[0])
        except Exception:              # the snapshot caught mid-write: read it again
            return None
        return step if step is not None and step >= self.after_step else None

    def _watch(self):
        import ray
        from ray.util.state import list_actors

        try:
            while not self._stop.wait(0.05):
                if self._checkpoint() is None:
                    continue
                workers = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                                      filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                step = self._checkpoint()     # again, just before the kill: what a restore starts from
                if not workers or step is None:
                    continue
                pid = max(w.pid for w in workers)
                os.kill(pid, signal.SIGKILL)
                self.killed_pid, self.at_checkpoint = pid, step
                return
        except Exception as exc:       # the test fails with it
            self.error = exc


def _metrics(history_file) -> list[dict]:
    """A stage's reported metrics, less those of the machine (speed, memory)."""
    return [{k: v for k, v in h.items() if k not in ("samples_per_s", "peak_rss_mb")}
            for h in json.loads(history_file.read_text())]


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_equals_undisturbed(stage_dir, export, undisturbed, killed_after: int) -> int:
    """The faulted stage restored once, mid-epoch, from the checkpoint seen before the
    kill (or one registered while the killer acted), took each step once on the
    undisturbed run's rows, and exported the undisturbed run's model. Returns the step
    it restored from."""
    import torch
    from safetensors.torch import load_file

    from cir.models.export import load_composer

    order = json.loads((stage_dir / "data_order.json").read_text())
    reference = json.loads((undisturbed[0] / "data_order.json").read_text())
    [restored] = order["restored_from"]
    assert killed_after <= restored < TOTAL_STEPS and restored % CHECKPOINT_EVERY == 0, order["restored_from"]
    assert restored % STEPS_PER_EPOCH, f"restored from step {restored}, an epoch's end"
    assert reference["restored_from"] == []
    assert_each_step_once(order, TOTAL_STEPS, workers=2)
    assert order["steps"] == reference["steps"], "the restored run consumed other rows"
    history, expected_history = (_metrics(folder / "history.json") for folder in (stage_dir, undisturbed[0]))
    assert [h["step"] for h in history] == list(range(CHECKPOINT_EVERY, TOTAL_STEPS, CHECKPOINT_EVERY)) + [TOTAL_STEPS]
    assert history == expected_history, "other losses or learning rates"
    weights, expected = (load_file(str(folder / "model.safetensors")) for folder in (export, undisturbed[1]))
    assert weights.keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in weights.items()), "the restored run trained another model"
    load_composer(export)
    return restored


@pytest.mark.slow
@pytest.mark.timeout(480)      # with the undisturbed run, its fixture
def test_a_killed_worker_is_restored_from_the_last_checkpoint(ray_session, small_benchmark, fault_storage,
                                                              undisturbed):
    from cir.train.run import run_folder, run_training

    cfg = fault_config(fault_storage, small_benchmark, "killed-restored", 1)
    with WorkerKiller(cfg, after_step=CHECKPOINT_EVERY) as killer:
        t0 = time.perf_counter()
        export = run_training(cfg)
    assert killer.error is None and killer.killed_pid, f"no worker was killed ({killer.error!r})"
    assert _pid_gone(killer.killed_pid)
    restored = assert_equals_undisturbed(run_folder(cfg) / "finetune", export, undisturbed, killer.at_checkpoint)
    print(f"killed worker pid {killer.killed_pid} after the step-{killer.at_checkpoint} checkpoint; restored "
          f"from step {restored} and finished in {time.perf_counter() - t0:.1f}s")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_with_no_restarts_a_killed_worker_stops_the_job_and_a_rerun_resumes(
        ray_session, small_benchmark, fault_storage, undisturbed, capsys):
    from conftest import load_job

    from cir.train.run import run_folder

    cfg = fault_config(fault_storage, small_benchmark, "killed-stopped", 0)
    config = fault_storage / "killed-stopped.yaml"
    config.write_text(yaml.safe_dump(asdict(cfg)))
    argv, job = ["--config", str(config)], load_job("train")
    with WorkerKiller(cfg, after_step=CHECKPOINT_EVERY) as killer:
        assert job.main(argv) == 1
    assert killer.error is None and killer.killed_pid, f"no worker was killed ({killer.error!r})"
    err = capsys.readouterr().err
    print(err)
    assert re.search(r"train: stopped: stage 'finetune' failed and Ray Train restarts it no more "
                     r"\(run.max_failures=0\): rank \d: \w+Error: ", err), err
    step = int(re.search(r"Its latest checkpoint is step (\d+) ", err).group(1))
    assert f"Its latest checkpoint is step {step} of {TOTAL_STEPS}: rerunning the same command (run name " \
           f"'killed-stopped') resumes from checkpoint step {step}, and no step is lost or repeated." in err
    assert f"to resume: python jobs/train.py --config {config}" in err
    stage_dir = run_folder(cfg) / "finetune"
    assert not (stage_dir / "export").exists() and not (stage_dir / "data_order.json").exists()
    assert job.main(argv) == 0                                   # the same command
    assert assert_equals_undisturbed(stage_dir, stage_dir / "export", undisturbed, killer.at_checkpoint) == step


def test_the_stop_message_names_the_failure_and_what_a_rerun_does(tmp_path):
    from ray.train import WorkerGroupError

    from cir.train.run import stopped_message

    cfg = tiny_config(tmp_path, run__max_failures=0)
    error = WorkerGroupError("rank 1 died", {1: RuntimeError("worker died\n  traceback lines")})
    message = stopped_message(cfg, cfg.stages[0], error, 16)   # no run folder: no checkpoint
    assert message == ("stage 'finetune' failed and Ray Train restarts it no more (run.max_failures=0): "
                       "rank 1: RuntimeError: worker died. It had written no checkpoint yet "
                       "(run.checkpoint_every=4): rerunning the same command starts it from step 0.")
    with pytest.raises(ValueError, match="run.max_failures must be >= 0, or -1 to restart always, got -2"):
        tiny_config(tmp_path, run__max_failures=-2)


def test_a_batch_digest_names_the_rows_and_their_order():
    """Over any columns a loop gets (the composer's features and texts, the generator's
    image bytes and missing paths): equal for the same rows, other for other rows or
    another order."""
    import numpy as np

    from cir.train.loop import batch_digest

    def rows(order):
        features = np.empty(len(order), dtype=object)
        features[:] = [np.full(4, i, np.float32) for i in order]
        return {"ref_feat": features, "text": np.array([f"text {i}" for i in order], dtype=object),
                "a_image": np.array([bytes([i]) * 3 for i in order], dtype=object),
                "a_path": np.array([None] * len(order), dtype=object), "n": np.array(order, np.int64)}

    digest = batch_digest(rows([0, 1, 2]))
    assert batch_digest(rows([0, 1, 2])) == digest
    assert batch_digest(rows([1, 0, 2])) != digest and batch_digest(rows([0, 1, 3])) != digest
    # continued over a step's micro-batches, in their order
    assert batch_digest(rows([2]), batch_digest(rows([0, 1]))) != batch_digest(rows([0, 1]), batch_digest(rows([2])))
