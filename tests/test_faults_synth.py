"""The synth job under faults, injected for real, against the undisturbed run (`shapes_synth`):

* the encoder actor and the text generator actor SIGKILLed mid-stage (found by pid
  through Ray's state API, once they have finished some blocks): Ray restarts each and
  redoes the blocks it held, and every image is encoded once, every pair's texts
  written once (`cir.actor_pool`);
* a block that kills its actor on every try fails the stage after a bounded number of
  tries, where Ray Data alone would retry it for ever;
* the driver of `jobs/synth.py` SIGKILLed mid-triplets, with its whole local Ray: a rerun
  with the same output skips the finished stages and generates only the pairs whose
  texts the killed run had not stored (`cir.synth.triplets`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from ray_cluster import LocalRayCluster

from cir.outputs import read_table
from cir.synth import triplets
from cir.synth.pipeline import GENERATED, SynthRun
from cir.synth.triplets import stored_rows
from conftest import REPO, shapes_synth_config as make_config

pytestmark = pytest.mark.slow

KEYS = {"corpus": "image_id", "embeddings": "image_id", "pairs": "pair_id", "triplets": "triplet_id"}
FLOATS = ("embedding", "similarity")


def _sorted(folder, stage: str):
    return read_table(folder / stage).sort_by(KEYS[stage])


def assert_same_table(out, reference, stage: str, exact: bool = True):
    """`stage` of `out` has the rows of the undisturbed run's, each once. Without `exact`,
    floats may differ in the last bits: the encoder's results depend on which rows share
    a batch (batched matrix products round differently), not only on the row."""
    got, want = _sorted(out, stage), _sorted(reference, stage)
    ids = got.column(KEYS[stage]).to_pylist()
    assert len(ids) == len(set(ids)), f"{stage}: rows written twice"
    assert ids == want.column(KEYS[stage]).to_pylist(), f"{stage}: rows lost or added"
    if exact:
        assert got.equals(want), f"{stage}: rows differ from the undisturbed run's"
        return
    floats = [c for c in FLOATS if c in got.column_names]
    assert got.drop_columns(floats).equals(want.drop_columns(floats)), f"{stage}: rows differ"
    for c in floats:
        a, b = got.column(c).to_pylist(), want.column(c).to_pylist()
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-6)


class ActorKiller:
    """A thread that SIGKILLs the live actor of a Ray Data stage, found through Ray's state
    API by class name, once `progress(actor_id)` says it has finished some blocks.

    On a quiet machine a tiny model gets through all its blocks in well under a second,
    faster than progress shows (task states reach the state API up to 100 ms late: the
    session's `RAY_task_events_report_interval_ms`), so the actor is braked from the
    moment it is found: SIGSTOPped, and let run `slice_s` at a time, until progress
    shows. The kill then lands after some blocks and before the last on a quiet machine
    as on a loaded one."""

    def __init__(self, udf: str, progress, slice_s: float):
        self.class_name = f"MapWorker(MapBatches({udf}))"
        self.progress, self.slice_s = progress, slice_s
        self.killed = None            # (actor id, pid, progress at the kill)
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise self.error

    def _watch(self):
        import ray
        from ray.util.state import list_actors

        address = ray.get_runtime_context().gcs_address
        filters = [("class_name", "=", self.class_name), ("state", "=", "ALIVE")]
        try:
            earlier = {a.actor_id for a in list_actors(address=address, filters=filters)}   # not this run's
            while not self._stop.wait(0.1):
                actors = [a for a in list_actors(address=address, filters=filters) if a.actor_id not in earlier]
                if actors:
                    self._brake_and_kill(actors[0].actor_id, actors[0].pid)
                    return
        except Exception as exc:       # re-raised in the test's thread
            self.error = exc

    def _brake_and_kill(self, actor_id: str, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        try:
            while not self._stop.is_set():
                done = self.progress(actor_id)
                if done:
                    os.kill(pid, signal.SIGKILL)
                    self.killed = (actor_id, pid, done)
                    return
                os.kill(pid, signal.SIGCONT)
                time.sleep(self.slice_s)
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.2)
        finally:
            if self.killed is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


def finished_blocks(udf: str, actor_id: str) -> int:
    """How many blocks the actor has finished, as far as the state API knows yet."""
    import ray
    from ray.util.state import list_tasks

    return len(list_tasks(address=ray.get_runtime_context().gcs_address, raise_on_missing_output=False,
                          filters=[("actor_id", "=", actor_id), ("name", "=", f"MapWorker(MapBatches({udf})).submit"),
                                   ("state", "=", "FINISHED")]))


def stage_tasks(udf: str) -> list:
    """Every attempt of the block tasks of a stage's actors (restarts keep the actor id)."""
    import ray
    from ray.util.state import list_tasks

    return list_tasks(address=ray.get_runtime_context().gcs_address, raise_on_missing_output=False, limit=10_000,
                      filters=[("name", "=", f"MapWorker(MapBatches({udf})).submit")])


def actor_state(actor_id: str):
    import ray
    from ray.util.state import list_actors

    (actor,) = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                           filters=[("actor_id", "=", actor_id)])
    return actor


def assert_restarted(udf: str, killer: ActorKiller, held_a_block: bool) -> int:
    """The killed actor came back (same actor, new process), and when it `held_a_block`,
    did again a block it held; returns the number of blocks of the stage."""
    actor_id, pid, _ = killer.killed
    after = actor_state(actor_id)
    assert after.num_restarts >= 1 and after.pid != pid, f"{udf}: the killed actor was not restarted"
    deadline = time.monotonic() + 15          # task states reach the state API a little late
    while True:
        tasks = stage_tasks(udf)
        redone = sum(t.attempt_number > 0 for t in tasks)
        if redone or not held_a_block:
            break
        assert time.monotonic() < deadline, f"{udf}: no block was redone after the kill"
        time.sleep(0.5)
    print(f"{udf}: pid {pid} killed, {redone} block tries redone by its restart (pid {after.pid})")
    return len({t.task_id for t in tasks})


@pytest.mark.timeout(400)
def test_a_killed_encoder_or_generator_actor_loses_and_repeats_nothing(shapes_synth, tmp_path, monkeypatch):
    """The encoder actor is killed after some blocks, then the generator actor after its
    first texts are stored: each is restarted (same actor, new pid), the encoder's blocks
    it held are redone, and the tables equal the undisturbed run's, each image and pair
    once."""
    import ray

    reference, _ = shapes_synth
    out = tmp_path / "out"
    # Blocks of a few rows (the corpus is one 200-row file): the stage is many blocks,
    # so the kill lands after some of them and before the last.
    monkeypatch.setattr(ray.data.DataContext.get_current(), "target_max_block_size", 8 * 1024)

    def encoded_blocks(actor_id):
        return finished_blocks("Embedder", actor_id)

    def stored_texts(actor_id):
        return len(_stored_pairs(out / GENERATED))

    # The generated rows as the stage reads them back before its commit: the killed
    # actor's blocks must be in the store once, not left out as a retried write's copy.
    stored = []

    def recording(store):
        files, keys = stored_rows(store)
        stored.append((sum(pq.ParquetFile(f).metadata.num_rows for f in store.glob("*.parquet")), len(keys)))
        return files, keys

    monkeypatch.setattr(triplets, "stored_rows", recording)

    with ActorKiller("Embedder", encoded_blocks, slice_s=0.02) as encoder, \
            ActorKiller("TemplateGenerator", stored_texts, slice_s=0.01) as generator:
        summary = SynthRun(make_config(out, generate__batch_size=4)).run()

    assert encoder.killed and generator.killed, "a stage finished before its actor was killed"
    blocks = assert_restarted("Embedder", encoder, held_a_block=True)
    assert encoder.killed[2] < blocks, "the encoder was killed after its last block"
    # The generator is killed once texts are stored, which a write task downstream does:
    # by then the fast template actor may have finished every block given to it (CI saw
    # it), and what it held, if anything, is redone.
    assert_restarted("TemplateGenerator", generator, held_a_block=False)
    assert generator.killed[2] < summary.stages["triplets"].rows, "the generator was killed after its last text"
    print(f"encoder killed after {encoder.killed[2]} of {blocks} blocks, generator after "
          f"{generator.killed[2]} of {summary.stages['triplets'].rows} texts were stored")
    assert summary.bad_images == [] and summary.stages["embeddings"].rows == 200
    rows, pairs = stored[-1]
    assert rows == pairs == summary.stages["triplets"].rows, "a generated block was stored twice"
    assert_same_table(out, reference, "embeddings", exact=False)
    assert_same_table(out, reference, "pairs", exact=False)
    assert_same_table(out, reference, "triplets", exact=False)
    assert not (out / GENERATED).exists()


CRASH_LOOP_DRIVER = r"""
import os, signal, sys
import ray
from cir.actor_pool import ActorCrashLoop, actor_pool, explain_actor_deaths

class CrashOn:
    # Kills its own actor process on the block holding `poison`, noting each try.
    def __init__(self, poison, tries):
        self.poison, self.tries = poison, tries

    def __call__(self, batch):
        if self.poison in batch["id"]:
            with open(self.tries, "a") as f:
                f.write("try\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return batch

ray.init(address=sys.argv[1], log_to_driver=False)
try:
    with explain_actor_deaths("embeddings"):
        ray.data.range(40, override_num_blocks=4).map_batches(
            CrashOn, fn_constructor_args=(17, sys.argv[2]), batch_size=10, **actor_pool(1)).materialize()
except ActorCrashLoop as exc:
    print(f"ActorCrashLoop: {exc}")
"""


@pytest.mark.timeout(300)
def test_a_block_that_kills_its_actor_every_time_fails_the_stage(ray_session, tmp_path):
    """Ray Data alone would restart the actor and retry the block for ever (max_task_retries
    -1): with `actor_pool`, the stage fails after 1 + ACTOR_TASK_RETRIES tries, saying so.
    The stage runs in a driver of its own on the session's Ray, as a job: Ray Data leaves
    a failed stage's actors to reference counting, and in this process something kept
    the restarted actor (and its CPU) alive after the test, so that the next 2-worker
    training run waited for it for ever; a driver's actors go when it exits."""
    import ray
    from ray.util.state import list_actors

    from cir.actor_pool import ACTOR_TASK_RETRIES

    tries = tmp_path / "tries"
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.run([sys.executable, "-c", CRASH_LOOP_DRIVER, address, str(tries)], cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    assert f"ActorCrashLoop: embeddings: a Ray Data actor died on each of the {ACTOR_TASK_RETRIES + 1} tries" \
        in driver.stdout, driver.stdout[-2000:] + driver.stderr[-3000:]
    assert tries.read_text().count("try") == 1 + ACTOR_TASK_RETRIES
    deadline = time.monotonic() + 30
    while list_actors(address=address, filters=[("class_name", "=", "MapWorker(MapBatches(CrashOn))"),
                                                ("state", "!=", "DEAD")]):
        assert time.monotonic() < deadline, "the failed stage's actor outlived its driver"
        time.sleep(0.2)


class SynthJob:
    """`jobs/synth.py` run as a user runs it: its own process group and its own local Ray
    (in a temp dir of its own), each process of which carries this job's token, so that
    the test can kill exactly those."""

    MARKER = "CIR_TEST_SYNTH_JOB"
    # Ray gives a new node's raylet 30 s to register, which a loaded machine can exceed;
    # the job then fails in ray.init, before it has touched its output.
    STARTUP_TIMEOUT = "timed out during startup"

    def __init__(self, out: Path, logs: Path):
        self.out, self.logs = out, logs
        self.token = uuid.uuid4().hex
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="cir-ray-"))    # short: Ray's socket paths must fit
        self.env = {**os.environ, "RAY_TMPDIR": str(self.ray_tmp), self.MARKER: self.token,
                    "RAY_AUTH_MODE": "disabled"}
        self.env.pop("RAY_ADDRESS", None)      # the job starts its own local Ray, as on a laptop
        # generate.batch_size changes the blocks, not the texts: the stage is 8 blocks.
        self.cmd = [sys.executable, "jobs/synth.py", "--output", str(out), "--set", "corpus.shapes.n_images=200",
                    "--set", "generate.batch_size=4"]
        self.runs = self.outlived_group = 0

    def start(self) -> tuple[subprocess.Popen, Path]:
        self.runs += 1
        log = self.logs / f"run-{self.runs}.log"
        with open(log, "wb") as f:
            return subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True), log

    def run_until(self, condition, timeout_s: float) -> None:
        """Start the job and SIGKILL it with its whole Ray once `condition()` holds."""
        for _ in range(3):
            driver, log = self.start()
            deadline = time.monotonic() + timeout_s
            try:
                while not condition():
                    if driver.poll() is not None:
                        break
                    assert time.monotonic() < deadline, f"not there after {timeout_s} s: {log.read_text()[-3000:]}"
                    time.sleep(0.02)
                else:
                    return
            finally:
                self.kill(driver)
            assert self.STARTUP_TIMEOUT in log.read_text(), log.read_text()[-3000:]
        raise AssertionError(f"Ray did not start in 3 tries: {log.read_text()[-3000:]}")

    def run(self, timeout_s: float) -> str:
        """Run the job to its end; its output."""
        for _ in range(3):
            driver, log = self.start()
            try:
                returncode = driver.wait(timeout_s)
            finally:
                self.kill(driver)
            text = log.read_text()
            if returncode == 0:
                return text
            assert self.STARTUP_TIMEOUT in text, text[-3000:]
        raise AssertionError(f"Ray did not start in 3 tries: {text[-3000:]}")

    def kill(self, driver: subprocess.Popen) -> None:
        """SIGKILL the driver's process group: the driver, its raylet, GCS and workers (the
        rest of its Ray goes with them: Ray's processes die with their parent). Any process
        of that Ray still there then is killed too, and counted in `outlived_group`."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
        time.sleep(1)
        self.outlived_group += len(self.processes())
        LocalRayCluster._kill(lambda env: env.get(self.MARKER) == self.token)
        assert not self.processes(), "a process of the killed job's Ray is still running"

    def processes(self) -> list:
        import psutil

        def ours(proc):
            try:
                return proc.environ().get(self.MARKER) == self.token and proc.status() != psutil.STATUS_ZOMBIE
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                return False

        return [proc for proc in psutil.process_iter() if ours(proc)]

    def close(self) -> None:
        LocalRayCluster._kill(lambda env: env.get(self.MARKER) == self.token)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.mark.timeout(600)
def test_a_killed_driver_is_resumed_by_a_rerun(shapes_synth, tmp_path):
    """`jobs/synth.py` (its own local Ray) is SIGKILLed, with every process of that Ray, once
    the triplets stage has stored its first generated block. The rerun with the same
    output reuses corpus, embeddings and pairs (markers untouched), generates only the
    pairs the killed run had not stored, and ends with the undisturbed run's tables.
    The output starts with the undisturbed run's corpus and embeddings (an encoder
    actor's start costs more than the rest of the job here); the killed run mines and
    commits the pairs itself."""
    reference, _ = shapes_synth
    out = tmp_path / "out"
    for stage in ("corpus", "embeddings"):
        shutil.copytree(reference / stage, out / stage)
    job = SynthJob(out, tmp_path)
    try:
        job.run_until(lambda: _stored_pairs(out / GENERATED), timeout_s=400)
        kept = len(_stored_pairs(out / GENERATED))
        cut_short = len(list((out / GENERATED).glob("*/*.parquet"))) - _readable_files(out / GENERATED)
        pairs = read_table(out / "pairs").num_rows
        assert (out / "pairs" / "_SUCCESS.json").is_file() and not (out / "triplets").exists()
        assert 0 < kept < pairs
        print(f"driver killed with the texts of {kept} of {pairs} pairs stored, {cut_short} file(s) cut short; "
              f"{job.outlived_group} process(es) of its Ray outlived the group kill")
        finished = {stage: (out / stage / "_SUCCESS.json").stat().st_mtime_ns
                    for stage in ("corpus", "embeddings", "pairs")}

        log = job.run(timeout_s=400)
        for stage, mtime in finished.items():
            assert (out / stage / "_SUCCESS.json").stat().st_mtime_ns == mtime
            assert f"{stage}: already done" in log
        assert f"{kept} of {pairs} pairs' texts kept from an interrupted run" in log
        assert log.count("which a crash cut short") == cut_short
        assert "triplets: starting" in log and "synth finished" in log
        for stage in KEYS:
            assert_same_table(out, reference, stage)
        assert not (out / GENERATED).exists()
    finally:
        job.close()


def _stored_tables(store: Path) -> list:
    """The generated rows (ids) of each readable file in the store: a file that is being
    written, or that a kill cut short, has no footer yet."""
    tables = []
    for f in store.glob("*/*.parquet"):
        try:
            tables.append(pq.read_table(f, columns=["ref_id", "tgt_id"]))
        except (OSError, ValueError):
            continue
    return tables


def _stored_pairs(store: Path) -> set:
    return {pair for t in _stored_tables(store)
            for pair in zip(t.column("ref_id").to_pylist(), t.column("tgt_id").to_pylist())}


def _readable_files(store: Path) -> int:
    return len(_stored_tables(store))
