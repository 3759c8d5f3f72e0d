"""The `http` backend against an OpenAI-compatible test server (tests/chat_server.py)
serving the tiny chat model: answers, retries, a server that is down, the API key, and
the synth job end to end with resume."""
from __future__ import annotations

import os
import shutil
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from chat_server import ChatServer
from conftest import copy_mined, shapes_synth_config
from cir.generate.base import INPUT_COLUMNS
from cir.generate.http import EndpointError, HttpBackend, HttpOptions
from cir.generate.parse import parse_texts
from cir.outputs import read_table
from cir.synth.config import SynthConfig
from cir.synth.pipeline import SynthRun
from tiny_llm import MODIFY_TEXTS, REVERSE_ANSWER

MODEL = "tiny-chat"
# Ray workers get the environment of the process that started Ray, so a variable set
# later (monkeypatch) would reach the driver only: the key is set before any test
# starts Ray. monkeypatch serves the driver-side checks below.
KEY_ENV, KEY = "CIR_TEST_HTTP_KEY", "sk-test-7f3a9c0e5b1d"
os.environ[KEY_ENV] = KEY


@pytest.fixture(scope="module")
def chat_model(tiny_chat_model):
    import torch

    from cir.generate.hf import ChatModel

    threads = torch.get_num_threads()
    model = ChatModel(str(tiny_chat_model), threads=1)   # a tiny model on a busy machine: 1 thread is fastest
    yield model
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_server(chat_model):
    server = ChatServer(chat_model).start()
    yield server
    server.stop()


@pytest.fixture
def server(module_server):
    module_server.reset()
    return module_server


def make_backend(url, **options) -> HttpBackend:
    options = {"url": url, "model": MODEL, "max_retries": 3, "base_retry_wait_time_in_s": 0.05,
               "timeout_s": 20, **options}
    return HttpBackend(HttpOptions(**options), batch_size=8, num_actors=1)


def pairs(n: int):
    import ray

    from cir.data.shapes import caption, random_scene

    rng = np.random.default_rng(1)
    caps = [caption(random_scene(rng)) for _ in range(2 * n)]
    return ray.data.from_arrow(pa.table({
        "pair_id": [f"p{i}" for i in range(n)], "ref_id": [f"r{i}" for i in range(n)],
        "tgt_id": [f"t{i}" for i in range(n)], "similarity": pa.array([0.9] * n, pa.float32()),
        "ref_caption": caps[::2], "tgt_caption": caps[1::2]}))


def free_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1/chat/completions"


def test_generate_and_apply(ray_session, server):
    backend = make_backend(server.url)
    backend.validate()
    backend.check_cluster()
    rows = backend.generate(pairs(3), backend.tasks()[0], list(INPUT_COLUMNS)).take_all()
    assert sorted(r["pair_id"] for r in rows) == ["p0", "p1", "p2"]
    for row in rows:
        assert set(row) == set(INPUT_COLUMNS) | {"answer", "answer_tokens"}
        assert parse_texts(row["answer"]) == MODIFY_TEXTS and row["answer_tokens"] > len(MODIFY_TEXTS)
    assert server.answered == 1 + 3        # the check's 1-token request, then one per pair

    candidates = backend.apply(pairs(3)).take_all()
    assert len(candidates) == 3 * len(MODIFY_TEXTS)
    for pair in ("p0", "p1", "p2"):
        mine = [c for c in candidates if c["ref_id"] == "r" + pair[1:]]
        assert [c["text"] for c in mine] == MODIFY_TEXTS and [c["repeats"] for c in mine] == [False, True, False]
        assert all(c["reverse_text"] == REVERSE_ANSWER for c in mine)
    assert {(c["generator"], c["source"]) for c in candidates} == {(f"http:{MODEL}@modify.v1+reverse.v1", "llm")}


def test_429_and_500_are_retried(ray_session, server):
    server.fail_next(429, 500, 503, 500)
    rows = make_backend(server.url, max_retries=4).generate(pairs(2), make_backend("").tasks()[1],
                                                            list(INPUT_COLUMNS)).take_all()
    assert [r["reverse_answer"] for r in rows] == [REVERSE_ANSWER] * 2
    assert server.requests == 2 + 4 and server.answered == 2


def test_a_server_that_always_fails_ends_in_a_clear_error(ray_session, server):
    server.always = 500
    backend = make_backend(server.url, max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="HTTP 500 from http://127.0.0.1") as err:
        backend.generate(pairs(2), backend.tasks()[0], list(INPUT_COLUMNS)).take_all()
    assert time.monotonic() - t0 < 30
    assert "Reached maximum retries of 2" in str(err.value)
    assert server.requests >= 3 and server.answered == 0


def test_check_cluster_refuses_what_cannot_work(ray_session, server):
    t0 = time.monotonic()
    url = free_url()
    with pytest.raises(ConnectionError, match=f"{url} is unreachable.*server down"):
        make_backend(url).check_cluster()
    with pytest.raises(ConnectionError, match="unreachable"):
        make_backend("http://nonexistent.invalid/v1/chat/completions").check_cluster()
    with pytest.raises(EndpointError, match="HTTP 404"):
        make_backend(server.url.replace("/chat/", "/chat-typo/")).check_cluster()
    assert time.monotonic() - t0 < 15
    server.always = 503            # reachable, just busy: the run's retries may cope
    make_backend(server.url).check_cluster()


def test_the_key_comes_from_the_named_variable(ray_session, server):
    server.key = KEY
    backend = make_backend(server.url, api_key_env=KEY_ENV)
    backend.validate()
    backend.check_cluster()
    rows = backend.generate(pairs(2), backend.tasks()[1], list(INPUT_COLUMNS)).take_all()
    assert [r["reverse_answer"] for r in rows] == [REVERSE_ANSWER] * 2
    assert server.auth == [f"Bearer {KEY}"] * 3
    assert KEY not in repr(backend.fingerprint()) and KEY_ENV not in repr(backend.fingerprint())

    server.reset(key="sk-some-other-key")       # the server echoes what it was sent: redacted
    for check in (backend.check_cluster,
                  lambda: backend.generate(pairs(2), backend.tasks()[1], list(INPUT_COLUMNS)).take_all()):
        with pytest.raises(Exception, match=rf"refused the key in \${KEY_ENV} \(HTTP 401") as err:
            check()
        assert KEY not in str(err.value) and KEY not in "".join(traceback.format_exception(err.value))
    assert server.requests == 2, "a refused key is not retried"
    with pytest.raises(EndpointError, match="wants an API key.*api_key_env"):
        make_backend(server.url).check_cluster()


def test_validate_names_the_variable_never_the_key(monkeypatch):
    monkeypatch.delenv("CIR_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$CIR_TEST_NO_SUCH_KEY, which is not set"):
        make_backend("http://127.0.0.1:1/v1/chat/completions", api_key_env="CIR_TEST_NO_SUCH_KEY").validate()
    monkeypatch.setenv("CIR_TEST_NO_SUCH_KEY", "sk-anything")
    make_backend("http://127.0.0.1:1/v1/chat/completions", api_key_env="CIR_TEST_NO_SUCH_KEY").validate()
    with pytest.raises(ValueError, match="NAME of an environment variable") as err:
        make_backend("http://h/v1/chat/completions", api_key_env="sk-live-abc123").validate()
    assert "sk-live-abc123" not in str(err.value)
    cases = [({"url": "ftp://h/v1"}, "http\\(s\\) URL"), ({"url": "https://u:pw@h/v1"}, "must not hold credentials"),
             ({"model": ""}, "model must name"), ({"max_retries": -1}, "max_retries"),
             ({"timeout_s": 0}, "timeout_s"), ({"qps": 0}, "qps")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            make_backend(options.pop("url", "http://h/v1/chat/completions"), **options).validate()


# -- the synth job end to end -----------------------------------------------------------
def synth_config(output, url, **overrides) -> SynthConfig:
    """The session's default synth settings (`shapes_synth`) with the `http` backend on
    16 of their pairs."""
    return shapes_synth_config(output, generate__max_pairs=16, generate__backend="http", generate__batch_size=8,
                               generate__http__url=url, generate__http__model=MODEL,
                               generate__http__api_key_env=KEY_ENV, generate__http__max_retries=2,
                               generate__http__base_retry_wait_time_in_s=0.05, **overrides)


@pytest.fixture(scope="module")
def synth_run(shapes_synth, module_server, tmp_path_factory):
    """(output, summary, requests the server got) of the triplets stage with the `http`
    backend over the session's corpus and pairs."""
    module_server.reset(key=KEY)
    out = copy_mined(shapes_synth[0], tmp_path_factory.mktemp("synth-http") / "out")
    summary = SynthRun(synth_config(out, module_server.url)).run()
    assert [name for name, r in summary.stages.items() if not r.skipped] == ["triplets"]
    requests = module_server.requests
    module_server.reset()
    return out, summary, requests


def test_synth_run_writes_triplets_and_resumes(synth_run, server):
    out, summary, requests = synth_run
    triplets = read_table(out / "triplets")
    pairs_n = summary.stages["triplets"].extra["pairs"]
    assert requests == 1 + 2 * pairs_n          # the check, then a modify and a reverse request per pair
    # The tiny model's fixed answer of 3 texts: the filter drops the duplicate.
    assert summary.stages["triplets"].extra["filter"]["dropped"] == {"duplicate": pairs_n}
    assert triplets.num_rows == 2 * pairs_n
    assert set(triplets.column("text").to_pylist()) == {MODIFY_TEXTS[0], MODIFY_TEXTS[2]}
    assert set(triplets.column("reverse_text").to_pylist()) == {REVERSE_ANSWER}
    assert set(triplets.column("generator").to_pylist()) == {f"http:{MODEL}@modify.v1+reverse.v1"}

    server.key = KEY
    again = SynthRun(synth_config(out, server.url)).run()
    assert all(r.skipped for r in again.stages.values())
    assert server.requests == 1           # only check_cluster's request


def test_the_key_is_written_nowhere(synth_run):
    import ray

    out, _, _ = synth_run
    for folder in (out, Path(ray._private.worker._global_node.get_logs_dir_path())):  # and Ray's logs
        for path in folder.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path
    assert KEY_ENV not in (out / "triplets" / "_SUCCESS.json").read_text()


def test_a_server_that_goes_down_leaves_no_triplets(synth_run, chat_model, tmp_path):
    out, _, _ = synth_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "triplets")
    flaky = ChatServer(chat_model, key=KEY).start()
    flaky.down_after = 3                  # the check and two answers, then it stops listening
    try:
        t0 = time.monotonic()
        with pytest.raises(Exception, match="is unreachable: is the server down") as err:
            SynthRun(synth_config(copy, flaky.url)).run()
        assert time.monotonic() - t0 < 60
        assert KEY not in str(err.value)
    finally:
        flaky.stop()
    # No triplets; what was generated before the server went down waits for the rerun.
    assert sorted(p.name for p in copy.iterdir()) == ["_generated", "corpus", "embeddings", "pairs"]
