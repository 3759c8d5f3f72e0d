"""Serving under faults: an index shard's replica killed under load, or hung. Every answer
is the complete top-k the app gave before the fault or a 503 JSON error naming the shard,
never a shorter or different list; Serve replaces the replica, and the answers after
recovery are those before. Faults are real: SIGKILL / SIGSTOP of the replica's process,
found through Ray's state API."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from types import MethodType, SimpleNamespace

import httpx
import numpy as np
import pytest

from cir.serving.bench import http_load, mixed_forms, serve_replicas
from conftest import wait_until_healthy

K = 10
CONCURRENCY = 8


def search_answers(url: str, forms: list[dict]) -> list[list]:
    """Each search's (image_id, score) list, one search at a time."""
    answers = [None] * len(forms)

    def keep(i, response):
        assert response.status_code == 200, response.text[:300]
        answers[i] = [(r["image_id"], r["score"]) for r in response.json()["results"]]

    http_load(url, forms, 1, requests=len(forms), k=K, on_response=keep)
    return answers


def same_answer(got: list, expected: list) -> bool:
    """The same ids in the same order; scores equal but for float noise (the encoder's
    batches differ under load)."""
    return [i for i, _ in got] == [i for i, _ in expected] and \
        all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(got, expected))


def classify(response, expected: list, shard: str) -> str:
    """'ok' (200, the complete expected top-k), '503' (a JSON error naming `shard`), or
    what else came back."""
    if isinstance(response, Exception):
        return f"no answer: {type(response).__name__}"
    if response.status_code == 200:
        results = [(r["image_id"], r["score"]) for r in response.json()["results"]]
        return "ok" if len(results) == K and same_answer(results, expected) else f"wrong 200: {results}"
    if response.status_code == 503 and response.headers.get("content-type") == "application/json":
        error = response.json().get("error", {})
        if error.get("code") in ("unavailable", "timeout") and shard in error.get("message", ""):
            return "503"
    return f"{response.status_code}: {response.text[:300]}"


def wait_for(predicate, timeout: float, what: str):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        value = predicate()
        if value:
            return value, time.perf_counter() - t0
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def replacement(shard: str, old_pid: int):
    pids = serve_replicas().get(shard, [])
    return pids[0] if pids and old_pid not in pids else None


def report(capsys, name: str, figures: dict):
    with capsys.disabled():
        print(f"\nSERVE_FAULT {name} {json.dumps(figures)}")


@pytest.fixture
def forms(served_app):
    return mixed_forms(served_app.gallery_ids, served_app.image_path.read_bytes())


@pytest.mark.slow
@pytest.mark.timeout(300, func_only=True)
def test_a_shard_replica_killed_under_load_is_replaced_and_no_answer_is_partial(served_app, forms, capsys):
    shard = "IndexShard001"
    expected = search_answers(served_app.url, forms)
    (old_pid,) = serve_replicas()[shard]
    answers, load = [], {}

    def on_response(i, response):
        answers.append((time.perf_counter(), classify(response, expected[i % len(forms)], shard)))

    clients = threading.Thread(target=lambda: load.update(
        http_load(served_app.url, forms, CONCURRENCY, seconds=25, k=K, on_response=on_response)))
    clients.start()
    try:
        time.sleep(5)
        os.kill(old_pid, signal.SIGKILL)
        killed = time.perf_counter()
        new_pid, replaced_s = wait_for(lambda: replacement(shard, old_pid), 60, f"a new {shard} replica")
        healthy_s = wait_until_healthy(served_app.url, 60)
    finally:
        clients.join()
    kinds = {}
    for _, kind in answers:
        kinds[kind] = kinds.get(kind, 0) + 1
    late_503 = [t - killed for t, kind in answers if kind == "503"]
    report(capsys, "kill", {"shard": shard, "answers": len(answers), "complete_200": kinds.get("ok", 0),
                            "json_503": kinds.get("503", 0), "replaced_s": round(replaced_s, 2),
                            "healthz_200_s": round(replaced_s + healthy_s, 2),
                            "last_503_after_kill_s": round(max(late_503), 2) if late_503 else None,
                            "p99_ms": round(load["p99_ms"], 1)})
    # Serve sends a search the dead replica had not accepted to another, and holds new ones
    # until the replacement is up: only a search it was running at the kill is a 503.
    assert set(kinds) <= {"ok", "503"}, kinds
    # After recovery, under load and alone: the answers of before.
    assert any(kind == "ok" for t, kind in answers if t > killed + replaced_s + healthy_s)
    assert all(same_answer(a, e) for a, e in zip(search_answers(served_app.url, forms), expected))
    assert new_pid != old_pid and serve_replicas()[shard] == [new_pid]


@pytest.mark.slow
@pytest.mark.timeout(300, func_only=True)
def test_a_hung_shard_replica_is_a_503_after_the_request_timeout_and_is_replaced(served_app, forms, capsys):
    shard = "IndexShard000"
    timeout = served_app.settings.request_timeout_s
    expected = search_answers(served_app.url, forms)
    (old_pid,) = serve_replicas()[shard]
    answers = {}

    def ask(name, call):
        t0 = time.perf_counter()
        answers[name] = (call(), time.perf_counter() - t0)

    os.kill(old_pid, signal.SIGSTOP)
    try:
        hung = time.perf_counter()
        asks = [threading.Thread(target=ask, args=("search", lambda: httpx.post(
                    f"{served_app.url}/search", data={**forms[0]["data"], "k": str(K)}, timeout=120))),
                threading.Thread(target=ask, args=("healthz", lambda: httpx.get(f"{served_app.url}/healthz",
                                                                                timeout=120)))]
        for t in asks:
            t.start()
        for t in asks:
            t.join()
        # Serve's health checks time out on it (health_check_timeout_s, 3 in a row): it is
        # killed and another started.
        new_pid, _ = wait_for(lambda: replacement(shard, old_pid), 120, f"a new {shard} replica")
        wait_until_healthy(served_app.url, 60)
        recovered_s = time.perf_counter() - hung
    finally:
        try:
            os.kill(old_pid, signal.SIGCONT)      # a stopped process would outlive a failed test
        except ProcessLookupError:
            pass
    (search, search_s), (health, health_s) = answers["search"], answers["healthz"]
    report(capsys, "hang", {"shard": shard, "search_503_s": round(search_s, 2), "healthz_503_s": round(health_s, 2),
                            "replaced_and_healthy_s": round(recovered_s, 2)})
    assert classify(search, expected[0], shard) == "503" and search.json()["error"]["code"] == "timeout", search.text
    assert timeout <= search_s < timeout + 15, search_s
    assert health.status_code == 503 and shard in health.json()["error"]["message"], health.text
    assert health.json()["deployments"]["IndexShard001"] == "ok"
    # 3 health checks timing out in a row, the replica's graceful-shutdown wait, and ~30 s
    # to start another on a loaded machine (Serve's defaults: over 100 s).
    shard_options = served_app.settings.shard
    assert recovered_s < 3 * (shard_options.health_check_period_s + shard_options.health_check_timeout_s) + \
        shard_options.graceful_shutdown_timeout_s + 30, recovered_s
    assert all(same_answer(a, e) for a, e in zip(search_answers(served_app.url, forms), expected))
    assert new_pid != old_pid and not alive(old_pid)


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Reply:
    """What a deployment handle's call gives the ingress: awaitable (an answer, an error,
    or, for None, nothing ever) and cancellable."""

    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def __await__(self):
        if self.outcome is None:
            yield from asyncio.sleep(3600).__await__()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self):
        self.cancelled = True


class Shard:
    def __init__(self, name: str, outcome):
        self.deployment_name, self.reply = name, Reply(outcome)
        self.search = self

    def remote(self, *args):
        return self.reply


@pytest.mark.timeout(60)
def test_a_shard_that_dies_holding_a_search_or_never_answers_fails_the_whole_search():
    """The ingress's own merge, with the one failure a real kill rarely catches (a shard
    dying while it runs the search): the other shard's top-k is never answered alone."""
    from ray.exceptions import ActorDiedError

    from cir.serving.inputs import ApiError
    from serve.ingress import SearchIngress
    from serve.settings import ServeSettings

    def top_k(*outcomes):
        """SearchIngress.top_k over shards with these outcomes; its answer or ApiError."""
        ingress = SimpleNamespace(settings=ServeSettings(request_timeout_s=0.5),
                                  shards=[Shard(f"IndexShard{i:03d}", o) for i, o in enumerate(outcomes)])
        ingress.call = MethodType(SearchIngress.func_or_class.call, ingress)
        try:
            return asyncio.run(SearchIngress.func_or_class.top_k(ingress, np.ones(4, np.float32), 2, False)), \
                ingress.shards
        except ApiError as exc:
            return exc, ingress.shards

    answer = (np.array([0.9, 0.5], np.float32), np.array(["a", "b"], object))
    other = (np.array([0.7, 0.1], np.float32), np.array(["c", "d"], object))
    assert top_k(answer, other)[0] == (["a", "c"], [pytest.approx(0.9), pytest.approx(0.7)])
    died, _ = top_k(answer, ActorDiedError())
    assert (died.status, died.code) == (503, "unavailable")
    assert "index shard 1 of 2 (IndexShard001) is unavailable" in died.message
    silent, shards = top_k(ActorDiedError(), None)
    assert (silent.status, silent.code) == (503, "unavailable") and shards[1].reply.cancelled
    assert "index shard 0 of 2 (IndexShard000) is unavailable" in silent.message
    assert "index shard 1 of 2 (IndexShard001) did not answer within 0.5 s" in silent.message
