"""Checking a search request's parts before any model sees them.

Every failure is a `ApiError`: an HTTP status, a short code a client can branch on,
a message that names the problem, and the form field it concerns. The server answers
it as JSON and stays up. Nothing here fetches a URL or opens a path: an image arrives
as uploaded bytes, or as the id of a gallery image that the server looks up itself.
"""
from __future__ import annotations

from dataclasses import dataclass

# Form fields a search accepts; any other is refused, so a typo is not silently ignored.
SEARCH_FIELDS = ("image", "image_id", "text", "k", "dedupe")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class ApiError(Exception):
    """An error a client caused (4xx) or can retry (503), answered as JSON."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


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

    def public(self) -> dict:
        return {"max_k": self.max_k, "default_k": self.default_k, "max_text_chars": self.max_text_chars,
                "max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels}


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


def parse_text(value: str | None, limits: Limits) -> str | None:
    """None when absent; an empty or whitespace-only text is an error (omit the field)."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        raise ApiError(422, "empty_text", "text is empty: type a modification, or omit the field "
                         "to search by the image alone", "text")
    if len(text) > limits.max_text_chars:
        raise ApiError(422, "text_too_long", f"text is {len(text)} characters, over the limit of "
                         f"{limits.max_text_chars}", "text")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        raise ApiError(422, "bad_text", "text contains control characters", "text")
    return text


def parse_image_id(value: str | None, limits: Limits) -> str | None:
    if value is None:
        return None
    if not value or len(value) > limits.max_image_id_chars:
        raise ApiError(422, "bad_image_id", f"image_id must be 1 to {limits.max_image_id_chars} characters",
                         "image_id")
    return value


def decode_upload(data: bytes, limits: Limits):
    """An RGB PIL image from uploaded bytes, at most `max_side` on its longest side."""
    from cir.encoders import ImageTooLarge, decode_image

    if not data:
        raise ApiError(422, "bad_image", "the uploaded image is empty", "image")
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, "too_large", f"the uploaded image is {len(data):,} bytes, over the limit of "
                         f"{limits.max_upload_bytes:,}", "image")
    try:
        image = decode_image(data, max_pixels=limits.max_pixels)
    except ImageTooLarge as exc:
        raise ApiError(413, "too_many_pixels", str(exc), "image") from None
    except ValueError as exc:
        raise ApiError(422, "bad_image", f"the upload is {exc}", "image") from None
    if max(image.size) > limits.max_side:
        image.thumbnail((limits.max_side, limits.max_side))
    return image
