"""Shared fixtures: one local Ray per test session (ray.init costs ~6 s and ~1 GB)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Task states reach the state API every 100 ms, not every second: the fault tests find a
# stage's progress there, and a second's lag let a fast actor finish its stage before it
# was killed (CI saw it once).
os.environ.setdefault("RAY_task_events_report_interval_ms", "100")
# The session Ray's logs (~50 MB a run) go to a folder of their own, removed when every
# test passed and kept, for its worker logs, when one failed.
_OWN_RAY_TMPDIR = "RAY_TMPDIR" not in os.environ
if _OWN_RAY_TMPDIR:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="cir-ray-")


def load_job(name: str):
    """The module of `jobs/NAME.py` (jobs are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2,
                 include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def shapes_synth_config(output, **overrides):
    """configs/local.yaml over 200 shapes images, with `a__b=value` overrides."""
    from cir.config import load_config
    from cir.synth.config import SynthConfig

    pairs = [("output", str(output)), ("corpus.shapes.n_images", 200)] + list(overrides.items())
    return load_config(SynthConfig, REPO / "configs" / "local.yaml", [(k.replace("__", "."), v) for k, v in pairs])


@pytest.fixture(scope="session")
def shapes_synth(ray_session, tmp_path_factory):
    """(output, summary) of the synth job's default run (`template` texts) over 200 shapes
    images: test_synth checks it, and the tests of other text backends start from its
    corpus, embeddings and pairs (`copy_mined`)."""
    from cir.synth.pipeline import SynthRun

    out = tmp_path_factory.mktemp("synth") / "out"
    return out, SynthRun(shapes_synth_config(out)).run()


# The S3 storage tests run against CIR_TEST_S3_URI. When it is unset, pytest_configure
# starts a moto S3 server on loopback for the session (a child process: Ray Data tasks in
# other processes reach it over TCP) and points CIR_TEST_S3_URI at a bucket there, before
# any test module is imported and before the first ray.init, so the Ray workers inherit it.
S3_TEST_BUCKET = "cir-test"
S3_TEST_KEY = S3_TEST_SECRET = "testing"      # moto takes any credentials
_MOTO_CHILD = r"""
import logging, os, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)     # no line per request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
os.dup2(2, 1)                                               # anything else goes to the log
sys.stdin.read()                                            # EOF: pytest ended, or died
server.stop()
"""
_moto: dict = {}                 # "process", "log" while the session's moto server runs
S3_SKIP_REASON = "CIR_TEST_S3_URI names no S3 endpoint"


def _start_moto_s3() -> None:
    """Start the session's moto S3 server, make its bucket and set CIR_TEST_S3_URI and the
    AWS variables; on failure, say why in S3_SKIP_REASON (the S3 tests skip with it)."""
    import select
    import subprocess
    import sys
    import urllib.request

    global S3_SKIP_REASON
    missing = [m for m in ("moto", "flask", "flask_cors") if importlib.util.find_spec(m) is None]
    if missing:
        S3_SKIP_REASON = (f"no S3 endpoint: CIR_TEST_S3_URI is unset and {', '.join(missing)} is not installed "
                          "for the local moto server (pip install -e '.[test]', which has moto[server])")
        return
    log = tempfile.TemporaryFile(prefix="cir-moto-", suffix=".log")      # no name: nothing left behind
    process = subprocess.Popen([sys.executable, "-c", _MOTO_CHILD], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=log, text=True)
    _moto.update(process=process, log=log)
    try:
        if not select.select([process.stdout], [], [], 60)[0]:
            raise TimeoutError("no port after 60 s")
        port = int(process.stdout.readline())     # the port, once it listens (~0.5 s)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/{S3_TEST_BUCKET}", method="PUT")
        urllib.request.urlopen(request, timeout=60).close()
    except Exception as exc:
        tail = " ".join(_stop_moto_s3().split())[-600:]
        S3_SKIP_REASON = (f"no S3 endpoint: CIR_TEST_S3_URI is unset and the local moto server did not start "
                          f"({type(exc).__name__}: {exc}); its log: {tail or '(empty)'}")
        return
    # Credentials in the URI, and in the environment for every other reader: a URI
    # rebuilt from a Location (str() drops KEY:SECRET) and the Ray workers started later.
    os.environ.update(AWS_ACCESS_KEY_ID=S3_TEST_KEY, AWS_SECRET_ACCESS_KEY=S3_TEST_SECRET,
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    os.environ["CIR_TEST_S3_URI"] = (f"s3://{S3_TEST_KEY}:{S3_TEST_SECRET}@{S3_TEST_BUCKET}/tests"
                                     f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1")


def _stop_moto_s3() -> str:
    """Stop the moto server; its log."""
    process, log = _moto.pop("process"), _moto.pop("log")
    process.stdin.close()                         # the child stops its server and exits
    try:
        process.wait(timeout=10)
    except Exception:
        process.kill()
        process.wait()
    process.stdout.close()
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.close()
    return text


def pytest_configure(config):
    if not os.environ.get("CIR_TEST_S3_URI"):
        _start_moto_s3()


def pytest_sessionfinish(session, exitstatus):
    if _OWN_RAY_TMPDIR and exitstatus == 0:          # the session's Ray is shut down by now
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


def pytest_unconfigure(config):
    if _moto:
        _stop_moto_s3()
        os.environ.pop("CIR_TEST_S3_URI", None)


def s3_test_uri() -> str | None:
    """A fresh URI under CIR_TEST_S3_URI (an S3-compatible endpoint for the storage tests,
    e.g. a moto or MinIO server: `s3://KEY:SECRET@bucket/prefix?endpoint_override=127.0.0.1:5055`
    `&scheme=http&region=us-east-1&allow_bucket_creation=true`), or None when unset.
    Unset, pytest_configure sets it to a local moto server's bucket (moto[server] is in
    the test extra)."""
    import uuid

    base = os.environ.get("CIR_TEST_S3_URI")
    if not base:
        return None
    path, _, query = base.partition("?")
    return f"{path.rstrip('/')}/{uuid.uuid4().hex[:8]}" + (f"?{query}" if query else "")


@pytest.fixture
def s3_uri() -> str:
    """A fresh, empty S3 URI (`s3_test_uri()`), or a skip saying why there is none."""
    uri = s3_test_uri()
    if uri is None:
        pytest.skip(S3_SKIP_REASON)
    return uri


def uri_child(uri: str, name: str) -> str:
    """`uri`/`name`, the URI's options kept at the end."""
    path, _, query = uri.partition("?")
    return f"{path.rstrip('/')}/{name}" + (f"?{query}" if query else "")


MINED_STAGES = ("corpus", "embeddings", "pairs")


def copy_mined(synth_dir: Path, output: Path) -> Path:
    """`output` holding the finished corpus, embeddings and pairs of `synth_dir`: a run
    there with the same corpus, encode and mine settings skips them (their fingerprints
    match) and makes only the triplets with its own text backend."""
    output.mkdir(parents=True)
    for stage in MINED_STAGES:
        shutil.copytree(synth_dir / stage, output / stage)
    return output


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A save_pretrained folder of a tiny chat model with known answers (tests/tiny_llm.py)."""
    from tiny_llm import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="session")
def small_benchmark(tmp_path_factory):
    """A shapes benchmark: 300 train, 60 val and 60 test queries (~300 images a split)."""
    from cir.data.shapes_corpus import write_benchmark

    return write_benchmark(tmp_path_factory.mktemp("shapes") / "bench", seed=3, n_train=300, n_val=60, n_test=60)


@pytest.fixture(scope="session")
def trained_shapes_export(ray_session, small_benchmark, tmp_path_factory):
    """(export folder, its TrainConfig) of a composer trained on `small_benchmark`."""
    from trained import shapes_training_config

    from cir.train.run import run_training

    cfg = shapes_training_config(tmp_path_factory.mktemp("trained"), small_benchmark)
    return run_training(cfg), cfg


@pytest.fixture(scope="session")
def four_step_export(ray_session, small_benchmark, tmp_path_factory):
    """(export folder, its TrainConfig) of `trained.four_step_config`."""
    from trained import four_step_config

    from cir.train.run import run_training

    cfg = four_step_config(tmp_path_factory.mktemp("four-steps"), small_benchmark)
    return run_training(cfg), cfg


@pytest.fixture(scope="session")
def shapes_index(ray_session, tmp_path_factory):
    """(IndexJobConfig, results) of the index job over a 60-image shapes corpus in 2
    shards: test_index_job checks it, test_multinode compares a cluster's run with it."""
    from cir.data.shapes_corpus import write_corpus
    from cir.index.job import IndexJobConfig, IndexRun

    root = tmp_path_factory.mktemp("index-job")
    corpus = write_corpus(root / "corpus", 60, seed=7, image_size=64)
    cfg = IndexJobConfig(gallery=str(corpus), output=str(root / "out"), shards=2)
    return cfg, IndexRun(cfg).run()


@pytest.fixture(scope="session")
def search_index(trained_shapes_export, small_benchmark, tmp_path_factory):
    """The index job's output over the val gallery of `small_benchmark`, encoded by the
    trained export, in 2 shards."""
    from cir.index.job import IndexJobConfig, IndexRun

    export, _ = trained_shapes_export
    cfg = IndexJobConfig(gallery=str(small_benchmark / "val" / "gallery.parquet"), encoder=f"checkpoint:{export}",
                         output=str(tmp_path_factory.mktemp("search-index") / "index"), shards=2)
    IndexRun(cfg).run()
    return cfg


@dataclass
class ServedApp:
    url: str                  # http://127.0.0.1:PORT, no trailing slash
    image_path: Path          # a PNG of a gallery image, to upload
    gallery_ids: list
    settings: object          # the app's ServeSettings


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports. The sockets stay bound until all are picked:
    one at a time, the OS may hand out a port it just released again (CI once got the
    same port for two of a `ray start`'s flags, and the head failed to start)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


# The search app of serve/, shared by the modules that use `served_app` (the test_serve*
# modules, which run one after another): "app" is its ServedApp while it runs.
_search_app: dict = {}
_SERVED_MODULES: set = set()       # the modules with a test that uses `served_app`


def _start_search_app(search_index, upload_dir: Path) -> ServedApp:
    import pyarrow.parquet as pq
    from ray import serve

    from serve.app import build_app
    from serve.settings import ServeSettings

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(index=search_index.output, shards=search_index.shards)
    serve.run(build_app(settings), name="cir-search", route_prefix="/")
    gallery = pq.read_table(search_index.gallery, columns=["image_id", "image"])
    image_path = upload_dir / "reference.png"
    image_path.write_bytes(gallery.column("image")[0].as_py())
    return ServedApp(f"http://127.0.0.1:{port}", image_path, gallery.column("image_id").to_pylist(), settings)


def wait_until_healthy(url: str, timeout_s: float = 60) -> float:
    """Seconds until the app's /healthz answers 200 (while replicas recover, the proxy may
    refuse or hold a request: each try waits 5 s at most)."""
    import httpx

    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"healthz 200 at {url}: not within {timeout_s:.0f} s")
        time.sleep(0.2)


def _stop_search_app() -> None:
    if _search_app.pop("app", None) is not None:
        from ray import serve

        serve.shutdown()


@pytest.fixture(scope="module")
def served_app(search_index, tmp_path_factory):
    """The search app of serve/ under `serve.run`, on a free loopback port. Started by the
    first module that asks and kept for the next ones that do (an app start is ~20 s);
    stopped before the first test of a module that does not (`pytest_runtest_setup`):
    its replicas hold 1.25 of the session's 2 CPUs, which Ray Data and Ray Train need back."""
    if "app" in _search_app:
        wait_until_healthy(_search_app["app"].url)      # test_serve_faults kills its replicas
    else:
        _search_app["app"] = _start_search_app(search_index, tmp_path_factory.mktemp("upload"))
    return _search_app["app"]


def pytest_collection_modifyitems(items):
    _SERVED_MODULES.update(item.module.__name__ for item in items if "served_app" in item.fixturenames)


_last_module: list = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Between modules: stop the shared search app unless this module uses it, then make
    sure that the session's Ray has all its CPUs free for the module's tests."""
    module = item.module.__name__
    if module == _last_module[0]:
        return
    _last_module[0] = module
    if module not in _SERVED_MODULES:
        _stop_search_app()
    if "app" not in _search_app and "ray_session" in item.fixturenames:
        _wait_for_idle_ray(module)


def _wait_for_idle_ray(module: str, timeout_s: float = 30) -> None:
    """Fail the module's first test, naming what holds them, when the session's Ray has
    CPUs busy that no test runs on: a leaked actor made every later training job wait for
    ever (a 2-worker run needs both CPUs), and the whole suite overran CI's limit."""
    import gc

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    deadline = time.monotonic() + timeout_s
    collected = False
    while True:
        total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
        if free >= total:
            return
        if not collected:
            # A failed Ray Data stage leaves its actors to reference counting, and the
            # error's traceback (a reference cycle) holds their handles until a collection.
            gc.collect()
            collected = True
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    from ray.util.state import list_actors

    holders = [f"{a.class_name} (pid {a.pid})" for a in list_actors(
        address=ray.get_runtime_context().gcs_address, detail=True, filters=[("state", "=", "ALIVE")])
        if (a.required_resources or {}).get("CPU")]
    pytest.fail(f"{free:g} of the session Ray's {total:g} CPUs are free {timeout_s:.0f} s after the module "
                f"before {module} ended; held by {', '.join(holders) or 'tasks or placement groups'}")
