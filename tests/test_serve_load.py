"""Load: 60 s of searches at concurrency 16 on loopback against the served app, with its
default capacity (`ServeSettings`): every answer a 200 (no 5xx, and no 503: 16 clients
are not an overload), p99 and throughput reported, and no replica's memory growing by
10% or more between the end of a warm-up and the end of the run."""
from __future__ import annotations

import json

import pytest

from cir.serving.bench import load_run, mixed_forms

pytestmark = pytest.mark.slow
SECONDS, CONCURRENCY, WARMUP = 60, 16, 200


@pytest.mark.timeout(240, func_only=True)
def test_sixty_seconds_at_concurrency_16_are_all_answered_and_replica_memory_stays_flat(served_app, capsys):
    forms = mixed_forms(served_app.gallery_ids, served_app.image_path.read_bytes())
    result = load_run(served_app.url, forms, CONCURRENCY, SECONDS, k=10, warmup=WARMUP)
    figures = {key: result[key] for key in ("seconds", "concurrency", "requests", "statuses", "server_errors")}
    figures.update({key: round(result[key], 1) for key in ("p50_ms", "p99_ms", "throughput_rps")},
                   rss_mb_after={n: round(v, 1) for n, v in result["rss_mb_after"].items()},
                   rss_growth_pct={n: round(100 * g, 2) for n, g in result["rss_growth"].items()})
    with capsys.disabled():
        print(f"\nSERVE_LOAD {json.dumps(figures)}")
    assert result["statuses"] == {"200": result["requests"]}, result["statuses"]
    assert result["requests"] >= SECONDS, result                    # at least one search a second
    assert set(result["rss_growth"]) == {"SearchIngress", "QueryEncoder", "IndexShard000", "IndexShard001"}
    assert result["max_rss_growth"] < 0.10, result["rss_growth"]
