"""The HTTP side of the app: routes, form parsing and errors (`serve.app` wires it to
the encoder and shard deployments).

    POST /search        multipart form: image (upload) | image_id, text, k, dedupe
    GET  /images/{id}   a gallery image's JPEG thumbnail
    GET  /gallery       a page of gallery images (to pick a reference from)
    GET  /info          encoder, index manifest, shard sizes, request limits
    GET  /healthz       every deployment answers
    GET  /              the search page (serve/static/)

Every error is JSON `{"error": {"code", "message", "field"}}` with a 4xx status (5xx only
for a replica that is down or overloaded). /openapi.json describes every route, its
answers and POST /search's form at the replica's limits (tests/test_serve_fuzz.py fuzzes
the app from it).
"""
import asyncio
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from cir.serving.inputs import (SEARCH_FIELDS, ApiError, ErrorBody, Limits, decode_upload, image_id_schema,
                                parse_bool, parse_image_id, parse_k, parse_text, search_request_body)
from serve.settings import ServeSettings

STATIC = Path(__file__).resolve().parent / "static"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
FORM_OVERHEAD = 64 * 1024          # the body beyond the image: other fields and multipart framing
# Uploads decoded at once per replica, each in a thread so the event loop keeps answering.
# A PNG at the default `max_pixels` (25 MP) took the ingress's peak memory up ~135 MB:
# this bounds what a burst of large uploads can hold at one time.
DECODE_SLOTS = 2
logger = logging.getLogger("ray.serve")

api = FastAPI(title="Composed image retrieval", version="1",
              description="Search a gallery with a reference image and a modification text.")
api.mount("/static", StaticFiles(directory=STATIC), name="static")


class GalleryItem(BaseModel):
    image_id: str
    caption: Optional[str]
    category: Optional[str]


class Result(GalleryItem):
    rank: int
    score: float
    thumbnail_url: str


class SearchQuery(BaseModel):
    image_id: Optional[str]
    uploaded: bool
    text: Optional[str]
    k: int
    dedupe: bool


class SearchAnswer(BaseModel):
    query: SearchQuery
    results: list[Result]
    timing_ms: dict[str, float]


class GalleryPage(BaseModel):
    total: int
    offset: int
    items: list[GalleryItem]


class Health(BaseModel):
    status: str
    rows: int
    deployments: dict[str, str]


class Info(BaseModel):
    encoder: dict
    index: dict
    shards: list[dict]
    gallery_rows: int
    limits: dict


ERRORS = {400: "the form cannot be parsed", 404: "no gallery image has this id",
          411: "the body has no Content-Length", 413: "the body or the image is over a limit (bytes or pixels)",
          415: "not a multipart or url-encoded form", 422: "a field or parameter is invalid: the error names it",
          503: "a deployment is at capacity, being replaced, or did not answer in time: retry shortly"}


def answers(ok: type[BaseModel] | dict, *errors: int) -> dict:
    """A route's documented answers (FastAPI's `responses=`): 200 and the ErrorBody statuses."""
    return {200: ok if isinstance(ok, dict) else {"model": ok},
            **{s: {"model": ErrorBody, "description": ERRORS[s]} for s in errors}}


def document_limits(limits: Limits) -> None:
    """Make /openapi.json describe what the app checks itself, at these limits: POST
    /search's form (`parse_form` reads it, so FastAPI cannot see its fields) and the
    image_id of /images/{image_id}."""
    def openapi() -> dict:
        if api.openapi_schema is None:
            paths = FastAPI.openapi(api)["paths"]
            paths["/search"]["post"]["requestBody"] = search_request_body(limits)
            (param,) = paths["/images/{image_id}"]["get"]["parameters"]
            param["schema"] = image_id_schema(limits)
        return api.openapi_schema

    api.openapi_schema = None
    api.openapi = openapi


document_limits(Limits())           # each replica documents its own limits as it starts


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
    """The request body, refused before any of it is read when its Content-Length is over
    `limit` (413), or when it is chunked, of unknown length (411): Serve's replica pulls a
    request's whole body from the proxy whether or not the app reads it, so only a declared
    length can be refused in time (a 50 MB chunked body cost the ingress ~150 MB of memory
    before this refusal)."""
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        if "transfer-encoding" not in request.headers:
            return b""                            # no body at all
        raise ApiError(411, "length_required", "send the form with a Content-Length header (browsers, curl -F "
                         "and HTTP libraries do for a form); a body of unknown length is not accepted")
    if int(declared) > limit:
        raise ApiError(413, "too_large", f"the request body is {int(declared):,} bytes, over the limit of {limit:,}")
    return await request.body()


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
        document_limits(self.limits)
        self.decoding = asyncio.Semaphore(DECODE_SLOTS)
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
            self._encoder_info = await self.call(self.encoder.describe.remote())
        return self._encoder_info

    @api.get("/", include_in_schema=False)
    async def page(self):
        return FileResponse(STATIC / "index.html")

    @api.get("/healthz", responses=answers(Health, 503))
    async def healthz(self):
        """200 when the encoder and every shard answer (each within `request_timeout_s`);
        else 503 naming each deployment that does not."""
        handles = [self.encoder, *self.shards]
        replies = await asyncio.gather(*[self.call(h.describe.remote(), h.deployment_name) for h in handles],
                                       return_exceptions=True)
        states = {h.deployment_name: ("ok" if not isinstance(r, BaseException) else
                                      r.message if isinstance(r, ApiError) else f"failed: {type(r).__name__}")
                  for h, r in zip(handles, replies)}
        down = [name for name, state in states.items() if state != "ok"]
        if down:
            message = f"not answering: {', '.join(down)}; Serve replaces a lost replica, retry shortly"
            return JSONResponse({"status": "unavailable", "deployments": states,
                                 "error": {"code": "unavailable", "message": message, "field": None}},
                                status_code=503)
        return {"status": "ok", "rows": self.manifest["rows"], "deployments": states}

    @api.get("/info", responses=answers(Info, 503))
    async def info(self):
        shards = await asyncio.gather(*[self.call(s.describe.remote(), f"index shard {s.deployment_name}")
                                        for s in self.shards])
        return {"encoder": await self.encoder_info(), "index": self.manifest, "shards": shards,
                "gallery_rows": len(self.gallery), "limits": self.limits.public()}

    @api.get("/gallery", responses=answers(GalleryPage, 422))
    async def gallery_page(self, offset: int = Query(0, ge=0), limit: int = Query(48, ge=1, le=500)):
        return {"total": len(self.gallery), "offset": offset, "items": self.gallery.page(offset, limit)}

    @api.get("/images/{image_id:path}", response_class=Response,
             responses=answers({"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                                "description": "the image's JPEG thumbnail"}, 404, 422))
    async def thumbnail(self, image_id: str):
        image_id = parse_image_id(image_id, self.limits)
        data = self.gallery.thumbnail(image_id) if image_id in self.gallery else None
        if data is None:
            raise ApiError(404, "unknown_image_id", f"no gallery image {image_id[:80]!r}", "image_id")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    @api.post("/search", responses=answers(SearchAnswer, 400, 404, 411, 413, 415, 422, 503))
    async def search(self, request: Request):
        t0 = time.perf_counter()
        form = await parse_form(request, self.limits.max_upload_bytes + FORM_OVERHEAD)
        text = parse_text(form.get("text"), self.limits)
        k = parse_k(form.get("k"), self.limits)
        dedupe = parse_bool(form.get("dedupe"), "dedupe")
        image_id = parse_image_id(form.get("image_id"), self.limits)
        image = await self.reference_image(form.get("image"), image_id)
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

    async def reference_image(self, upload: bytes | None, image_id: str | None):
        from cir.encoders import decode_image

        if upload is not None and image_id is not None:
            raise ApiError(422, "two_references", "give an uploaded image or an image_id, not both", "image_id")
        if upload is not None:
            async with self.decoding:
                return await asyncio.to_thread(decode_upload, upload, self.limits)
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
        n = len(self.shards)
        parts = await asyncio.gather(*[self.call(s.search.remote(query, fetch, dedupe),
                                                 f"index shard {i} of {n} ({s.deployment_name})")
                                       for i, s in enumerate(self.shards)], return_exceptions=True)
        # The shards that answered do not hold the index's top-k: one failed shard fails the
        # search, a 503 naming every shard that failed, never a shorter or different list.
        failed = [p for p in parts if isinstance(p, BaseException)]
        if failed:
            unexpected = [p for p in failed if not isinstance(p, ApiError)]
            raise unexpected[0] if unexpected else ApiError(503, failed[0].code, "; ".join(p.message for p in failed))
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

    async def call(self, response, what: str = "the query encoder"):
        """A deployment call's answer within `request_timeout_s`, or a 503 naming `what`:
        its queue is full (backpressure), its replica died holding the request, or no
        replica took it in time (one being replaced, or none coming back). Never a hang."""
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import DeploymentUnavailableError

        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(response, timeout)
        except BackPressureError as exc:
            raise ApiError(503, "overloaded", f"{what} is at capacity, retry shortly ({exc.message})") from None
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(503, "timeout", f"{what} did not answer within {timeout:g} s (a replica may be "
                           "restarting), retry shortly") from None
        except (RayActorError, ActorUnavailableError, DeploymentUnavailableError) as exc:
            raise ApiError(503, "unavailable", f"{what} is unavailable (its replica was lost; Serve starts "
                           f"another), retry shortly: {type(exc).__name__}") from None
