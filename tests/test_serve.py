"""The search app of serve/ end to end under `serve.run`: a trained tiny composer over
the val gallery of a shapes benchmark, in 2 shards. The API's answers are the ones the
same model and index give in-process; every bad input is a 4xx that names it."""
from __future__ import annotations

import io
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def search(app, files=None, timeout=60, **fields):
    data = {k: str(v) for k, v in fields.items()}
    return httpx.post(f"{app.url}/search", data=data, files=files, timeout=timeout)


@pytest.fixture(scope="module")
def in_process(search_index, trained_shapes_export, small_benchmark):
    """The same model and index in this process, and the val queries."""
    from cir.index.search import ShardedIndex
    from cir.query_encoders import load_query_encoder

    export, _ = trained_shapes_export
    queries = pq.read_table(small_benchmark / "val" / "queries.parquet").to_pylist()
    gallery = pq.read_table(search_index.gallery, columns=["image_id", "image"])
    images = dict(zip(gallery.column("image_id").to_pylist(), gallery.column("image").to_pylist()))
    return (load_query_encoder(f"checkpoint:{export}", threads=1),
            ShardedIndex.load(Path(search_index.output) / "index"), queries, images)


def test_answers_are_the_in_process_top_k_and_recall_is_far_above_chance(served_app, in_process):
    from cir.encoders import decode_image

    model, index, queries, images = in_process
    hits = 0
    for q in queries:
        got = search(served_app, image_id=q["ref_id"], text=q["text"], k=10)
        assert got.status_code == 200, got.text
        results = got.json()["results"]
        vector = model.encode_queries([decode_image(images[q["ref_id"]])], [q["text"]])
        scores, ids = index.search(vector, 10)[0]
        assert [r["image_id"] for r in results] == list(ids)
        assert [r["score"] for r in results] == pytest.approx(list(scores), abs=1e-5)
        hits += q["tgt_id"] in ids
    chance = 10 / len(images)
    assert hits / len(queries) >= max(0.3, 5 * chance), hits


def test_an_upload_finds_what_its_gallery_id_finds(served_app, in_process):
    _, _, queries, images = in_process
    q = queries[0]
    by_id = search(served_app, image_id=q["ref_id"], text=q["text"], k=5).json()
    upload = search(served_app, files={"image": ("ref.png", images[q["ref_id"]], "image/png")},
                    text=q["text"], k=5).json()
    assert [r["image_id"] for r in upload["results"]] == [r["image_id"] for r in by_id["results"]]
    assert upload["query"]["uploaded"] and not by_id["query"]["uploaded"]


def test_a_text_alone_or_an_image_alone_is_a_query(served_app, in_process):
    _, _, queries, _ = in_process
    for fields in ({"text": "add a small red circle"}, {"image_id": queries[0]["ref_id"]}):
        got = search(served_app, k=7, **fields)
        assert got.status_code == 200 and len(got.json()["results"]) == 7, got.text


def test_dedupe_collapses_near_duplicates_and_still_fills_k(served_app, in_process):
    _, index, queries, _ = in_process
    got = search(served_app, image_id=queries[1]["ref_id"], text=queries[1]["text"], k=10, dedupe="true").json()
    ids = [r["image_id"] for r in got["results"]]
    assert len(ids) == 10 and got["query"]["dedupe"]
    vectors = {}
    for shard in index.shards:
        row = {i: n for n, i in enumerate(shard.ids)}
        vectors.update({i: shard.index.reconstruct(row[i]) for i in ids if i in row})
    v = np.stack([vectors[i] for i in ids])
    sims = v @ v.T - 2 * np.eye(len(ids))
    assert sims.max() < served_app.settings.dedupe_threshold
    scores = [r["score"] for r in got["results"]]
    assert scores == sorted(scores, reverse=True)


def test_info_health_gallery_thumbnails_and_page(served_app, search_index):
    from PIL import Image

    info = httpx.get(f"{served_app.url}/info").json()
    assert info["encoder"]["spec"].startswith("checkpoint:") and info["encoder"]["uses_images"]
    assert sum(s["rows"] for s in info["shards"]) == info["index"]["rows"] == info["gallery_rows"] == \
        len(served_app.gallery_ids)
    assert httpx.get(f"{served_app.url}/healthz").json()["status"] == "ok"
    everything = httpx.get(f"{served_app.url}/gallery", params={"limit": 500}).json()
    listed = [i["image_id"] for i in everything["items"]]
    assert everything["total"] == len(listed) and sorted(listed) == sorted(served_app.gallery_ids)
    page = httpx.get(f"{served_app.url}/gallery", params={"offset": 5, "limit": 3}).json()
    assert [i["image_id"] for i in page["items"]] == listed[5:8]
    thumb = httpx.get(f"{served_app.url}/images/{served_app.gallery_ids[0]}")
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size[0] > 0
    html = httpx.get(f"{served_app.url}/")
    assert html.status_code == 200 and "/static/app.js" in html.text
    assert httpx.get(f"{served_app.url}/static/app.js").status_code == 200


def test_every_bad_input_is_a_4xx_that_names_it_and_the_server_stays_up(served_app, in_process):
    _, _, queries, images = in_process
    ref, good_png = queries[0]["ref_id"], images[queries[0]["ref_id"]]
    url = f"{served_app.url}/search"

    def upload(data, name="x.png"):
        return {"image": (name, data, "image/png")}

    cases = [
        ("not an image", dict(files=upload(b"this is not an image"), data={"text": "x"}), 422, "bad_image"),
        ("truncated image", dict(files=upload(good_png[: len(good_png) // 2]), data={"text": "x"}), 422, "bad_image"),
        ("empty text", dict(data={"image_id": ref, "text": "  "}), 422, "empty_text"),
        ("overlong text", dict(data={"image_id": ref, "text": "a" * 501}), 422, "text_too_long"),
        ("k = 0", dict(data={"text": "x", "k": "0"}), 422, "bad_k"),
        ("k over the maximum", dict(data={"text": "x", "k": "101"}), 422, "bad_k"),
        ("k not a number", dict(data={"text": "x", "k": "ten"}), 422, "bad_k"),
        ("unknown image_id", dict(data={"image_id": "no-such-image", "text": "x"}), 404, "unknown_image_id"),
        ("image and image_id", dict(files=upload(good_png), data={"image_id": ref}), 422, "two_references"),
        ("an image as a plain field", dict(data={"image": "http://example.com/x.png"}), 422, "bad_image"),
        ("unknown field", dict(data={"text": "x", "topk": "5"}), 422, "unknown_field"),
        ("nothing to search with", dict(data={"k": "5"}), 422, "empty_query"),
        ("bad dedupe", dict(data={"text": "x", "dedupe": "maybe"}), 422, "bad_dedupe"),
        ("JSON body", dict(json={"text": "x"}), 415, "unsupported_media_type"),
        ("no content type", dict(content=b"text=x"), 415, "unsupported_media_type"),
        ("malformed form", dict(content=b"--b\r\nContent-Disposition: form-data\r\n\r\nxx",
                                headers={"content-type": "multipart/form-data; boundary=b"}), 400, "malformed_form"),
    ]
    for name, kwargs, status, code in cases:
        got = httpx.post(url, timeout=60, **kwargs)
        assert got.status_code == status, (name, got.status_code, got.text[:300])
        error = got.json()["error"]
        assert error["code"] == code and error["message"], (name, error)
    assert httpx.get(f"{served_app.url}/images/no-such-image").status_code == 404
    assert httpx.get(f"{served_app.url}/gallery", params={"limit": 0}).json()["error"]["code"] == "bad_parameter"
    assert httpx.get(f"{served_app.url}/healthz").json()["status"] == "ok"
    assert search(served_app, image_id=ref, text="x", k=3).status_code == 200


def test_the_server_never_fetches_a_url_a_client_sends(served_app):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(2)
    target = f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"
    for fields in ({"image_id": target}, {"text": target}, {"image_id": target, "text": "x"}):
        search(served_app, **fields)
    with pytest.raises(socket.timeout):
        listener.accept()
    listener.close()


@pytest.mark.timeout(300)
def test_overload_is_a_503_from_backpressure_not_a_hang(served_app, search_index):
    """A second app whose ingress takes 1 request and queues 1: a burst gets 503s at once."""
    from ray import serve

    from serve.app import build_app

    s = served_app.settings
    free = {"num_cpus": 0, "autoscaling": None}          # the first app holds the 2 CPUs
    small = {"num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1, **free}
    settings = s.model_copy(update={"ingress": s.ingress.model_copy(update=small),
                                    "query_encoder": s.query_encoder.model_copy(update=free),
                                    "shard": s.shard.model_copy(update=free)})
    serve.run(build_app(settings), name="overload", route_prefix="/overload")
    try:
        statuses, bodies = [], []

        def hit():
            r = httpx.post(f"{served_app.url}/overload/search", data={"text": "add a red star", "k": "5"}, timeout=60)
            statuses.append(r.status_code)
            bodies.append(r.text)

        threads = [threading.Thread(target=hit) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert len(statuses) == 24 and set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
        assert any("backpressure" in b for b, s in zip(bodies, statuses) if s == 503)
    finally:
        serve.delete("overload")


def test_config_yaml_is_what_serve_accepts_and_the_app_settings_check_it():
    from pydantic import ValidationError
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    import serve.app
    from serve.settings import ServeSettings

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "serve.app:build_app"
    settings = ServeSettings.model_validate(app["args"])
    assert (settings.index, settings.shards) == ("outputs/index-local", 2)   # what `python jobs/index.py` writes
    assert isinstance(call_user_app_builder_with_args_if_necessary(serve.app.build_app, app["args"]), Application)
    assert isinstance(serve.app.app, Application)                          # what `serve build` needs
    for typo in ({"indx": "x"}, {"shard": {"num_replica": 2}}, {"query_encoder": {"autoscaling": {"max_replica": 2}}}):
        with pytest.raises(ValidationError):
            ServeSettings.model_validate({**app["args"], **typo})


def test_serving_a_model_the_index_was_not_built_for_is_refused(search_index):
    from cir.index.build import read_manifest
    from cir.query_encoders import serving_model

    manifest = read_manifest(Path(search_index.output) / "index")
    assert serving_model(manifest)[0] == manifest["encoder"]
    with pytest.raises(ValueError, match="rebuild the index"):
        serving_model(manifest, model="baseline:sum", encoder="cir-shapes")
    with pytest.raises(ValueError, match="rebuild the index"):
        serving_model({"encoder": "cir-shapes", "dim": 128}, model="baseline:sum", encoder="cir-tiny")
