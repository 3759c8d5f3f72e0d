"""The HTTP side of the app: routes, form parsing and errors (`serve.app` wires it to
the encoder and shard deployments).

    POST /search        multipart form: image (upload) | image_id, text, k, dedupe
    GET  /images/{id}   a gallery image's JPEG thumbnail
    GET  /gallery       a page of gallery images (to pick a reference from)
    GET  /info          encoder, index manifest, shard sizes, request limits
    GET  /healthz       every deployment answers
    GET  /              the search page (serve/static/)

Every error is JSON `{"error": {"code", "message", "field"}}` with a 4xx status (5xx only
for a replica that is down or overloaded).
"""
import asyncio
import logging
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from cir.serving.inputs import (SEARCH_FIELDS, ApiError, decode_upload, parse_bool, parse_image_id,
                                parse_k, parse_text)
from serve.settings import ServeSettings

STATIC = Path(__file__).resolve().parent / "static"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
FORM_OVERHEAD = 64 * 1024          # the body beyond the image: other fields and multipart framing
logger = logging.getLogger("ray.serve")

api = FastAPI(title="Composed image retrieval", version="1",
              description="Search a gallery with a reference image and a modification text.")
api.mount("/static", StaticFiles(directory=STATIC), name="static")


@api.exception_handler(ApiError)
async def _bad_request(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse({"error": {"code": code, "message": str(exc.detail), "field": None}},
                        status_code=exc.status_code)


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception):
    logger.exception("search app: unexpected error")
    return JSONResponse({"error": {"code": "internal", "message": f"internal error: {type(exc).__name__}",
                                   "field": None}}, status_code=500)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    field = str(first["loc"][-1]) if first.get("loc") else None
    return JSONResponse({"error": {"code": "bad_parameter", "message": f"{field}: {first['msg']}", "field": field}},
                        status_code=422)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (whether or
    not a Content-Length announced it)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"the request body is {int(declared):,} bytes, over the limit of {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the request body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_form(request: Request, limit: int) -> dict:
    """The search form as {field: str | bytes (an upload)}, each field at most once."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in FORM_TYPES:
        raise ApiError(415, "unsupported_media_type", f"send the search as multipart/form-data (an image "
                         f"upload) or a url-encoded form, not {ctype or 'a body without a content type'}")
    body = await read_body(request, limit)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=len(SEARCH_FIELDS))
    except (HTTPException, ValueError, KeyError) as exc:
        raise ApiError(400, "malformed_form", f"the form cannot be parsed: {getattr(exc, 'detail', exc)}") from None
    fields: dict = {}
    for name, value in form.multi_items():
        if name not in SEARCH_FIELDS:
            raise ApiError(422, "unknown_field", f"unknown form field {name[:40]!r}; "
                             f"fields: {', '.join(SEARCH_FIELDS)}", name[:40])
        if name in fields:
            raise ApiError(422, "repeated_field", f"form field {name!r} given more than once", name)
        if hasattr(value, "read"):            # an upload
            data = await value.read()
            if name != "image":
                raise ApiError(422, "bad_field", f"{name} must be a plain field, not a file", name)
            if data or value.filename:        # a browser sends an empty part for an empty file input
                fields[name] = data
        else:
            if name == "image":
                raise ApiError(422, "bad_image", "image must be a file upload; to search by a gallery "
                                 "image, send its image_id", "image")
            fields[name] = value
    await form.close()
    return fields


@serve.deployment
@serve.ingress(api)
class SearchIngress:
    def __init__(self, encoder, shards: list, settings: dict):
        from cir.index.build import read_manifest
        from cir.index.gallery import GalleryStore

        self.settings = ServeSettings.model_validate(settings)
        self.limits = self.settings.request_limits()
        index_dir, gallery_dir = self.settings.folders()
        self.manifest = read_manifest(index_dir)
        if len(self.manifest["shards"]) != self.settings.shards:
            raise ValueError(f"{index_dir} has {len(self.manifest['shards'])} shards but the settings say "
                             f"shards: {self.settings.shards}; set shards: {len(self.manifest['shards'])}")
        self.gallery = GalleryStore(gallery_dir)
        self.encoder, self.shards = encoder, shards
        self._encoder_info = None

    async def encoder_info(self) -> dict:
        if self._encoder_info is None:
            self._encoder_info = await self.encoder.describe.remote()
        return self._encoder_info

    @api.get("/", include_in_schema=False)
    async def page(self):
        return FileResponse(STATIC / "index.html")

    @api.get("/healthz")
    async def healthz(self):
        try:
            await asyncio.wait_for(asyncio.gather(self.encoder.describe.remote(),
                                                  *[s.describe.remote() for s in self.shards]), timeout=10)
        except Exception as exc:      # any replica that does not answer makes the app unhealthy
            return JSONResponse({"status": "unavailable", "reason": str(exc)[:300]}, status_code=503)
        return {"status": "ok", "rows": self.manifest["rows"]}

    @api.get("/info")
    async def info(self):
        shards = await asyncio.gather(*[s.describe.remote() for s in self.shards])
        return {"encoder": await self.encoder_info(), "index": self.manifest, "shards": shards,
                "gallery_rows": len(self.gallery), "limits": self.limits.public()}

    @api.get("/gallery")
    async def gallery_page(self, offset: int = Query(0, ge=0), limit: int = Query(48, ge=1, le=500)):
        return {"total": len(self.gallery), "offset": offset, "items": self.gallery.page(offset, limit)}

    @api.get("/images/{image_id:path}")
    async def thumbnail(self, image_id: str):
        data = self.gallery.thumbnail(image_id) if image_id in self.gallery else None
        if data is None:
            raise ApiError(404, "unknown_image_id", f"no gallery image {image_id[:80]!r}", "image_id")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    @api.post("/search")
    async def search(self, request: Request):
        t0 = time.perf_counter()
        form = await parse_form(request, self.limits.max_upload_bytes + FORM_OVERHEAD)
        text = parse_text(form.get("text"), self.limits)
        k = parse_k(form.get("k"), self.limits)
        dedupe = parse_bool(form.get("dedupe"), "dedupe")
        image_id = parse_image_id(form.get("image_id"), self.limits)
        image = self.reference_image(form.get("image"), image_id)
        info = await self.encoder_info()
        image = image if info["uses_images"] else None
        text = text if info["uses_texts"] else None
        if image is None and text is None:
            needs = " and ".join(n for n, used in (("an image (upload or image_id)", info["uses_images"]),
                                                   ("a text", info["uses_texts"])) if used)
            raise ApiError(422, "empty_query", f"nothing to search with: {info['spec']} takes {needs}")
        t1 = time.perf_counter()
        vector = await self.call(self.encoder.encode.remote((image, text)))
        if isinstance(vector, str):
            raise ApiError(422, "unsupported_query", vector)
        t2 = time.perf_counter()
        ids, scores = await self.top_k(np.asarray(vector, np.float32), k, dedupe)
        t3 = time.perf_counter()
        results = [{"rank": r + 1, "score": float(s), **self.result_metadata(i),
                    "thumbnail_url": f"/images/{i}"} for r, (i, s) in enumerate(zip(ids, scores))]
        return {"query": {"image_id": image_id, "uploaded": "image" in form, "text": text, "k": k, "dedupe": dedupe},
                "results": results,
                "timing_ms": {"encode": round(1000 * (t2 - t1), 2), "search": round(1000 * (t3 - t2), 2),
                              "total": round(1000 * (t3 - t0), 2)}}

    def reference_image(self, upload: bytes | None, image_id: str | None):
        from cir.encoders import decode_image

        if upload is not None and image_id is not None:
            raise ApiError(422, "two_references", "give an uploaded image or an image_id, not both", "image_id")
        if upload is not None:
            return decode_upload(upload, self.limits)
        if image_id is None:
            return None
        if image_id not in self.gallery:
            raise ApiError(404, "unknown_image_id", f"no gallery image {image_id[:80]!r}", "image_id")
        data = self.gallery.reference(image_id)
        if data is None:
            raise ApiError(422, "no_reference_copy", "this gallery keeps no reference images "
                             "(built with reference_size: 0): upload the image instead", "image_id")
        return decode_image(data)

    async def top_k(self, query: np.ndarray, k: int, dedupe: bool):
        """The merged top-k over all shards; with `dedupe`, more candidates are fetched and
        near-duplicates of better results dropped."""
        from cir.index.search import collapse_near_duplicates, merge_topk

        fetch = min(4 * k, k + 100) if dedupe else k
        parts = await asyncio.gather(*[self.call(s.search.remote(query, fetch, dedupe)) for s in self.shards])
        scores, ids = merge_topk(parts, fetch)
        if dedupe:
            vectors = {i: v for p in parts for i, v in zip(p[1], p[2])}
            keep = collapse_near_duplicates(ids, np.stack([vectors[i] for i in ids]), self.settings.dedupe_threshold)
            scores, ids = scores[keep], ids[keep]
        return ids[:k].tolist(), scores[:k].tolist()

    def result_metadata(self, image_id: str) -> dict:
        if image_id in self.gallery:
            return self.gallery.metadata(image_id)
        return {"image_id": image_id, "caption": None, "category": None}

    @staticmethod
    async def call(response):
        """A deployment call; an overloaded or lost replica becomes a 503 that says so."""
        try:
            return await response
        except BackPressureError as exc:
            raise ApiError(503, "overloaded", f"the server is at capacity, retry shortly ({exc.message})") from None
        except ApiError:
            raise
        except Exception as exc:
            if type(exc).__name__ in ("RayActorError", "ActorDiedError", "DeploymentUnavailableError",
                                      "ActorUnavailableError"):
                raise ApiError(503, "unavailable", f"a replica is unavailable, retry shortly: {exc}"[:300]) from None
            raise
