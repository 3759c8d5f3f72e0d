"""Checking a search request's parts before any model sees them.

Every failure is a `ApiError`: an HTTP status, a short code a client can branch on,
a message that names the problem, and the form field it concerns. The server answers
it as JSON (`ErrorBody`) and stays up. Nothing here fetches a URL or opens a path: an
image arrives as uploaded bytes, or as the id of a gallery image that the server looks
up itself. `search_request_body` describes the same rules for the OpenAPI schema.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Optional

from pydantic import BaseModel, Field

# Form fields a search accepts; any other is refused, so a typo is not silently ignored.
SEARCH_FIELDS = ("image", "image_id", "text", "k", "dedupe")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
# The image formats an upload may be in. Pillow opens many more, but each is decoder code
# that a stranger's bytes reach (EPS even runs Ghostscript on them): only what browsers
# and cameras send.
UPLOAD_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
# Bidirectional embeddings, overrides and isolates make a string display as something it
# is not ("Trojan Source"); with the C0/C1 controls they have no place in a query or an id.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# The same rule for the OpenAPI schema, as JSON Schema regex classes (a text may hold tabs
# and line breaks, an id may not).
_REFUSED_IN_TEXT = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
_REFUSED_IN_ID = r"\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"


class ApiError(Exception):
    """An error a client caused (4xx) or can retry (503), answered as JSON."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class ErrorDetail(BaseModel):
    code: str = Field(description="a short code a client can branch on: bad_k, too_large, unknown_image_id, ...")
    message: str = Field(min_length=1, description="what is wrong, in words")
    field: Optional[str] = Field(description="the form field or parameter at fault; null when none is")


class ErrorBody(BaseModel):
    """Every error answer (`ApiError.body`)."""
    error: ErrorDetail


@dataclass(frozen=True)
class Limits:
    max_k: int = 100
    default_k: int = 12
    max_text_chars: int = 500
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 25_000_000
    # Uploads are shrunk to this longest side before they cross to the encoder (its own
    # preprocessing resizes to far less), so a large photo is not shipped around raw.
    max_side: int = 1024
    max_image_id_chars: int = 512
    # The encoder resizes an image's short side to its input size: a 1024 x 1 upload would
    # become a 229,376 x 224 intermediate there (~150 MB a query). No photo is this narrow.
    max_aspect: int = 20

    def public(self) -> dict:
        return {"max_k": self.max_k, "default_k": self.default_k, "max_text_chars": self.max_text_chars,
                "max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels,
                "max_aspect": self.max_aspect}


def parse_k(value: str | None, limits: Limits) -> int:
    if value is None or value == "":
        return limits.default_k
    try:
        k = int(value)
    except ValueError:
        raise ApiError(422, "bad_k", f"k must be an integer, got {value[:40]!r}", "k") from None
    if not 1 <= k <= limits.max_k:
        raise ApiError(422, "bad_k", f"k must be between 1 and {limits.max_k}, got {k}", "k")
    return k


def parse_bool(value: str | None, field: str) -> bool:
    text = (value or "").strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ApiError(422, f"bad_{field}", f"{field} must be true or false, got {value[:40]!r}", field)


def refuse_control_characters(value: str, field: str, allowed: str = "") -> None:
    """A 422 naming the first control, surrogate or bidirectional-override character in
    `value` (other than those in `allowed`) and where it is."""
    for i, c in enumerate(value):
        if c not in allowed and (c in BIDI_CONTROLS or unicodedata.category(c) in ("Cc", "Cs")):
            name = unicodedata.name(c, "a control character")
            raise ApiError(422, f"bad_{field}", f"{field} contains U+{ord(c):04X} ({name}) at character {i}: "
                           "control and bidirectional-override characters are not allowed", field)


def parse_text(value: str | None, limits: Limits) -> str | None:
    """None when absent; an empty or whitespace-only text is an error (omit the field)."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        raise ApiError(422, "empty_text", "text is empty: type a modification, or omit the field "
                         "to search by the image alone", "text")
    if len(text) > limits.max_text_chars:
        raise ApiError(422, "text_too_long", f"text is {len(text):,} characters, over the limit of "
                         f"{limits.max_text_chars}", "text")
    refuse_control_characters(text, "text", allowed="\t\n\r")
    return text


def parse_image_id(value: str | None, limits: Limits) -> str | None:
    """None when absent. Only ever a key to look up: an id shaped like a path or a URL is
    just an id no gallery image has (404)."""
    if value is None:
        return None
    if not value or len(value) > limits.max_image_id_chars:
        raise ApiError(422, "bad_image_id", f"image_id must be 1 to {limits.max_image_id_chars} characters, "
                         f"got {len(value):,}", "image_id")
    refuse_control_characters(value, "image_id")
    return value


def decode_upload(data: bytes, limits: Limits):
    """An RGB PIL image from uploaded bytes, at most `max_side` on its longest side; the
    first frame of an animation (the others are never decoded)."""
    from cir.encoders import ImageTooLarge, decode_image

    if not data:
        raise ApiError(422, "bad_image", "the uploaded image is empty", "image")
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, "too_large", f"the uploaded image is {len(data):,} bytes, over the limit of "
                         f"{limits.max_upload_bytes:,}", "image")
    try:
        image = decode_image(data, max_pixels=limits.max_pixels, formats=UPLOAD_FORMATS, max_side=limits.max_side)
    except ImageTooLarge as exc:
        raise ApiError(413, "too_many_pixels", str(exc), "image") from None
    except ValueError as exc:
        raise ApiError(422, "bad_image", f"the upload is {exc}", "image") from None
    width, height = image.size
    if max(width, height) > limits.max_aspect * min(width, height):
        raise ApiError(422, "bad_image", f"the image is {width}x{height} pixels (after shrinking to "
                         f"{limits.max_side} on its long side): its long side is over {limits.max_aspect} "
                         "times its short side", "image")
    return image


def image_id_schema(limits: Limits) -> dict:
    """What `parse_image_id` accepts, as a JSON Schema."""
    return {"type": "string", "minLength": 1, "maxLength": limits.max_image_id_chars,
            "pattern": f"^[^{_REFUSED_IN_ID}]*$", "description": "a gallery image's id (GET /gallery lists them)"}


def search_request_body(limits: Limits) -> dict:
    """POST /search's form as an OpenAPI requestBody: what `parse_form` and the parse_*
    functions above accept (the server also trims a text before it counts it)."""
    fields = {
        "image_id": {**image_id_schema(limits),
                     "description": "a gallery image to search from (GET /gallery lists them); not with image"},
        "text": {"type": "string", "minLength": 1, "maxLength": limits.max_text_chars,
                 "pattern": f"^[^{_REFUSED_IN_TEXT}]*[^{_REFUSED_IN_TEXT}\\s][^{_REFUSED_IN_TEXT}]*$",
                 "description": "the modification text: what to change in the reference image"},
        "k": {"type": "integer", "minimum": 1, "maximum": limits.max_k, "default": limits.default_k,
              "description": "how many results"},
        "dedupe": {"type": "boolean", "default": False,
                   "description": "drop near-duplicates of better results (still k results when the gallery has them)"},
    }
    image = {"type": "string", "format": "binary", "minLength": 1, "maxLength": limits.max_upload_bytes,
             "description": f"the reference image: {', '.join(UPLOAD_FORMATS)}, at most {limits.max_upload_bytes:,} "
                            f"bytes and {limits.max_pixels:,} pixels, sides at most {limits.max_aspect}:1 (an "
                            "animation: its first frame); not with image_id"}
    def form(properties: dict) -> dict:
        references = [name for name in ("image", "image_id") if name in properties]
        return {"type": "object", "properties": properties, "additionalProperties": False,
                # something to search with; one reference image at most
                "anyOf": [{"required": [name]} for name in (*references, "text")],
                **({"not": {"required": references}} if len(references) > 1 else {})}

    return {"required": True,
            "description": "an image (upload or image_id), a text, or both, as the served model takes them",
            "content": {"multipart/form-data": {"schema": form({"image": image, **fields})},
                        "application/x-www-form-urlencoded": {"schema": form(fields)}}}
