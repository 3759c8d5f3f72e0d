"""The search app under hostile input: requests generated from its own OpenAPI schema
(schemathesis over hypothesis), and hand-made hostile files and bodies. No input gets a
5xx or takes the server down: each is a 4xx JSON error that names the problem, or a 200
where the input is legitimate, and the ingress replica keeps its process and its memory."""
from __future__ import annotations

import io
import json
import socket
import struct
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.slow

# Generated requests per route and generation mode (schema-valid data, then invalid):
# /healthz and /info take no input (1 request each), the other 3 routes 2 x 80, so ~482
# requests, ~20 s on 2 loaded cores.
FUZZ_EXAMPLES = 80


def ingress_process() -> int:
    """The pid of the app's (one) ingress replica, from Ray's state API."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "ServeReplica:cir-search:SearchIngress"),
                                  ("state", "=", "ALIVE")])
    assert len(actors) == 1, actors
    return actors[0].pid


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def assert_error_names_the_problem(response, status: int | None = None, code: str | None = None) -> dict:
    """A 4xx answer is JSON {"error": {"code", "message", "field"}} with a message in words."""
    got = (response.status_code, response.text[:300])
    assert 400 <= response.status_code < 500 and (status is None or response.status_code == status), got
    ctype = response.headers.get("content-type") or ""
    ctype = ctype[0] if isinstance(ctype, list) else ctype       # schemathesis keeps a list per header
    assert ctype.startswith("application/json"), got
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"}, got
    assert isinstance(error["message"], str) and error["message"].strip(), got
    assert code is None or error["code"] == code, got
    return error


def error_body_names_the_problem(ctx, response, case):
    """A schemathesis check: every 4xx is JSON that names its problem."""
    if 400 <= response.status_code < 500:
        assert_error_names_the_problem(response)


@pytest.mark.timeout(600)
def test_requests_generated_from_the_openapi_schema_get_no_5xx_and_every_4xx_names_its_problem(served_app):
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    pid = ingress_process()
    schema = schemathesis.openapi.from_url(f"{served_app.url}/openapi.json")
    body = schema["/search"]["POST"].definition.raw["requestBody"]
    form = body["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"image", "image_id", "text", "k", "dedupe"}, form
    assert form["properties"]["k"]["maximum"] == served_app.settings.limits.max_k
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, error_body_names_the_problem]
    sent = defaultdict(Counter)              # route -> Counter of (mode, status)
    started = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        takes_input = bool(operation.path_parameters or operation.query or operation.body)
        modes = (schemathesis.GenerationMode.POSITIVE,) + ((schemathesis.GenerationMode.NEGATIVE,)
                                                            if takes_input else ())
        for mode in modes:
            @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck), print_blob=False)
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                response = case.call(base_url=served_app.url, timeout=60)
                sent[operation.label][mode.value, response.status_code] += 1
                case.validate_response(response, checks=checks)

            fuzz()
    seconds = time.perf_counter() - started
    report = {route: {mode: {str(status): n for (m, status), n in sorted(c.items()) if m == mode}
                      for mode in sorted({m for m, _ in c})} for route, c in sent.items()}
    print("FUZZ_REQUESTS " + json.dumps({"per_route": report, "total": sum(sum(c.values()) for c in sent.values()),
                                         "seconds": round(seconds, 1)}))
    assert set(sent) == {"GET /healthz", "GET /info", "GET /gallery", "GET /images/{image_id}", "POST /search"}
    search = report["POST /search"]                 # valid searches were answered, invalid ones refused
    assert search["positive"].get("200") and search["negative"].get("422"), search
    assert ingress_process() == pid                 # the same replica process throughout
    assert httpx.get(f"{served_app.url}/healthz", timeout=30).json()["status"] == "ok"


# Hostile files, built here in a few bytes each.

def chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, extra: bytes = b"", pixels: bool = True) -> bytes:
    """An RGB PNG of `width` x `height` black pixels, deflated (~1000:1); with
    pixels=False a few bytes that only claim the size (a decode bomb's header)."""
    deflate = zlib.compressobj(9)
    rows = (b"".join(deflate.compress(b"\0" * (1 + 3 * width)) for _ in range(height)) + deflate.flush()
            if pixels else zlib.compress(b"\0" * 64))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + extra + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def ztxt_bomb() -> bytes:
    """A 1-pixel PNG carrying a compressed text chunk that inflates to 50 MB."""
    return png(1, 1, extra=chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * (50 * 2**20), 9)))


def gif(frames: int, frame_side: int = 1) -> bytes:
    """A looping 1 x 1 GIF of `frames` frames, each `frame_side` pixels square."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\0\0\0"
    frame = (b"\x21\xf9\x04\x00\x01\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, frame_side, frame_side, 0)
             + b"\x02\x02\x44\x01\x00")
    return screen + loop + frame * frames + b"\x3b"


def jpeg(width: int, height: int) -> bytes:
    """A 16 x 16 JPEG whose frame header claims `width` x `height` pixels."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(out, "JPEG")
    data = bytearray(out.getvalue())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def png_zip_polyglot() -> bytes:
    """A file that is a valid PNG and a valid ZIP archive holding an HTML page (ZIP
    readers find the archive from the end of the file, so anything may precede it)."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("index.html", POLYGLOT_PAGE)
    return png(32, 32) + archive.getvalue()


POLYGLOT_PAGE = "<script>alert('polyglot')</script>"


def upload(data: bytes, name: str = "x.png", media_type: str = "image/png") -> dict:
    return {"image": (name, data, media_type)}


# Ids shaped like paths and URLs: a gallery id is only ever looked up, never opened.
TRAVERSALS = ("../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
              "..\\..\\..\\windows\\win.ini", "/etc/passwd", "file:///etc/passwd", "....//....//etc/passwd")


@pytest.mark.timeout(300)
def test_hostile_files_and_fields_get_a_4xx_naming_them_or_a_200_and_the_replica_stays_up(served_app):
    """Bombs are refused before decoding (the replica's peak memory barely moves), odd but
    real images are searched, text and ids with control characters are refused."""
    url, ref = f"{served_app.url}/search", served_app.gallery_ids[0]
    refused = [
        ("PNG bomb: 60,000 x 60,000 pixels declared in 69 bytes",
         dict(files=upload(png(60_000, 60_000, pixels=False)), data={"text": "x"}), 413, "too_many_pixels"),
        ("PNG of 5,001 x 5,000 real pixels in 73 kB: over the 25 MP limit",
         dict(files=upload(png(5_001, 5_000)), data={"text": "x"}), 413, "too_many_pixels"),
        ("JPEG bomb: 60,000 x 60,000 pixels declared in 631 bytes",
         dict(files=upload(jpeg(60_000, 60_000), "x.jpg", "image/jpeg"), data={"text": "x"}), 413, "too_many_pixels"),
        ("GIF bomb: a 20,000 x 20,000 frame in a 1 x 1 GIF",
         dict(files=upload(gif(1, frame_side=20_000), "x.gif", "image/gif"), data={"text": "x"}), 413,
         "too_many_pixels"),
        ("PNG text bomb: a zTXt chunk that inflates to 50 MB",
         dict(files=upload(ztxt_bomb()), data={"text": "x"}), 422, "bad_image"),
        ("0-byte image", dict(files=upload(b""), data={"text": "x"}), 422, "bad_image"),
        ("an HTML page sent as a PNG",
         dict(files=upload(f"<html>{POLYGLOT_PAGE}</html>".encode()), data={"text": "x"}), 422, "bad_image"),
        ("PostScript (Pillow would hand it to Ghostscript)",
         dict(files=upload(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n", "x.eps",
                           "application/postscript"), data={"text": "x"}), 422, "bad_image"),
        ("1,000 x 10 pixels (sides 100:1)", dict(files=upload(png(1_000, 10)), data={"text": "x"}), 422, "bad_image"),
        ("a 100,000-character text", dict(data={"image_id": ref, "text": "a" * 100_000}), 422, "text_too_long"),
        ("NUL in the text", dict(data={"text": "add a red\x00 circle"}), 422, "bad_text"),
        ("a right-to-left override in the text", dict(data={"text": "add a \u202eelcric der"}), 422, "bad_text"),
        ("a C1 control (CSI) in the text", dict(data={"text": "add \x9b31m a circle"}), 422, "bad_text"),
        ("NUL in image_id", dict(data={"image_id": ref + "\x00", "text": "x"}), 422, "bad_image_id"),
        ("a right-to-left override in image_id", dict(data={"image_id": "\u202e" + ref}), 422, "bad_image_id"),
        *((f"path traversal as image_id: {t}", dict(data={"image_id": t, "text": "x"}), 404, "unknown_image_id")
          for t in TRAVERSALS),
    ]
    pid = ingress_process()
    peak = peak_rss_mb(pid)
    for what, request, status, code in refused:
        error = assert_error_names_the_problem(httpx.post(url, timeout=60, **request), status, code)
        assert error["field"] in ("image", "text", "image_id"), (what, error)
    refused_growth = peak_rss_mb(pid) - peak

    polyglot = png_zip_polyglot()
    with zipfile.ZipFile(io.BytesIO(polyglot)) as archive:          # really both
        assert archive.read("index.html").decode() == POLYGLOT_PAGE
    accepted = [
        # A tiny image is still an image: the encoder resizes it like any other.
        ("a 1-pixel PNG", png(1, 1)),
        # Only the first frame is ever decoded, so the frame count costs nothing.
        ("a GIF of 5,000 frames", gif(5_000)),
        # Nothing echoes or stores an upload: a polyglot is just the image it also is.
        ("a PNG that is also a ZIP archive holding an HTML page", polyglot),
        # A real decompression ratio of ~1000:1, at the pixel limit: decoded once, shrunk.
        ("a 25-megapixel PNG of 73 kB (at the limit)", png(5_000, 5_000)),
    ]
    for what, data in accepted:
        started = time.perf_counter()
        got = httpx.post(url, files=upload(data), data={"text": "add a red circle", "k": "3"}, timeout=60)
        assert got.status_code == 200 and got.headers["content-type"] == "application/json", (what, got.text[:300])
        assert len(got.json()["results"]) == 3 and "polyglot" not in got.text, (what, got.text[:300])
        print(f"HOSTILE_ACCEPTED {what}: {time.perf_counter() - started:.2f} s")
    growth = peak_rss_mb(pid) - peak
    print(f"HOSTILE_MEMORY ingress peak RSS {peak:.0f} MiB, +{refused_growth:.1f} MiB after {len(refused)} refused "
          f"inputs, +{growth:.1f} MiB after the {len(accepted)} accepted ones")
    # The bombs above would need 3.6 G to 10.8 GB decoded: refused on their headers.
    assert refused_growth < 64, refused_growth
    # The 25 MP PNG: ~75 MB decoded (RGB), never a second full-size copy.
    assert growth < 256, growth
    assert ingress_process() == pid
    assert httpx.get(f"{served_app.url}/healthz", timeout=30).json()["status"] == "ok"


def raw_get(app_url: str, path: str):
    """GET `path` sent exactly as written (httpx would resolve the dots): (status, headers, body)."""
    import http.client

    where = urlsplit(app_url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.mark.timeout(120)
def test_path_traversal_in_image_and_static_urls_never_reaches_a_file(served_app):
    paths = ["/images/../../../../etc/passwd", "/images/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
             "/images/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/images/..%252F..%252Fetc%252Fpasswd",
             "/images/..\\..\\..\\etc\\passwd", "/images/%00", "/images/%E2%80%AE" + served_app.gallery_ids[0],
             "/static/../ingress.py", "/static/..%2Fingress.py", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
             "/static/..%5C..%5Cingress.py"]
    statuses = {}
    for path in paths:
        status, headers, body = raw_get(served_app.url, path)
        statuses[path] = status
        assert b"root:" not in body and b"import" not in body, (path, body[:200])
        assert status in (404, 422) and headers["content-type"].startswith("application/json"), (path, status, body)
        error = json.loads(body)["error"]
        assert error["message"].strip(), (path, error)
    print("TRAVERSAL " + json.dumps(statuses))
    status, headers, body = raw_get(served_app.url, f"/images/{served_app.gallery_ids[0]}")
    assert status == 200 and headers["content-type"] == "image/jpeg"          # the route itself works


def post_streamed(app_url: str, size: int, chunked: bool) -> tuple[bytes, int, float]:
    """POST /search with a `size`-byte body streamed from a few zero bytes, stopping as
    soon as an answer comes (a client that reads while it sends). (the answer's raw
    bytes, the body bytes sent, seconds to the answer)."""
    import select

    where = urlsplit(app_url)
    sock = socket.create_connection((where.hostname, where.port), timeout=60)
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    sock.sendall(f"POST /search HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: multipart/form-data; "
                 f"boundary=b\r\n{length}\r\n\r\n".encode())
    zeros, pending, sent = bytes(2**16), b"", 0
    started = time.perf_counter()
    sock.setblocking(False)
    try:
        while pending or sent < size:
            readable, writable, _ = select.select([sock], [sock], [], 60)
            if readable:
                break                               # the answer came before the body was all sent
            if not pending:
                n = min(len(zeros), size - sent)
                pending, sent = (f"{n:x}\r\n".encode() + zeros[:n] + b"\r\n") if chunked else zeros[:n], sent + n
                if chunked and sent == size:
                    pending += b"0\r\n\r\n"
            pending = pending[sock.send(pending):]
    except (BrokenPipeError, ConnectionResetError):
        pass                                        # the server closed its side: read what it said
    seconds = time.perf_counter() - started
    sock.setblocking(True)
    answer = b""
    while not (b"\r\n\r\n" in answer and answer.endswith(b"}")):
        piece = sock.recv(2**16)
        if not piece:
            break
        answer += piece
    sock.close()
    return answer, sent, seconds


@pytest.mark.timeout(120)
def test_a_50_mb_body_is_refused_at_once_and_never_reaches_the_replica(served_app):
    pid = ingress_process()
    peak = peak_rss_mb(pid)
    size = 50 * 2**20
    answer, sent, seconds = post_streamed(served_app.url, size, chunked=False)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head, answer[:300]
    assert json.loads(body)["error"]["code"] == "too_large"
    print(f"BIG_BODY declared {size:,} bytes: 413 after {seconds:.2f} s, {sent / 2**20:.1f} MiB sent")
    assert seconds < 10
    # Without a length, a body cannot be refused before Serve has moved it all: it is not taken.
    answer, sent, seconds = post_streamed(served_app.url, size, chunked=True)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411"), answer[:300]
    assert json.loads(body)["error"]["code"] == "length_required"
    print(f"BIG_BODY chunked {size:,} bytes: 411 after {seconds:.2f} s, {sent / 2**20:.1f} MiB sent")
    growth = peak_rss_mb(pid) - peak
    print(f"BIG_BODY ingress peak RSS +{growth:.1f} MiB")
    assert growth < 16, growth              # the body never came to the ingress replica
    assert ingress_process() == pid
    assert httpx.get(f"{served_app.url}/healthz", timeout=30).json()["status"] == "ok"
