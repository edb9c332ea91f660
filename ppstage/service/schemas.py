"""Request and response bodies of the HTTP API (msgspec Structs).

Request bodies refuse unknown fields: a misspelt field is an error naming it,
never silently ignored (unlike wire types, which tolerate new fields for
schema evolution). ``decode_body`` turns every decode failure into a
``BadRequest`` that names the offending field.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

Prompt = Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
Timestep = Annotated[int, msgspec.Meta(gt=0, le=1000)]


class PromptRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/prompt``: new conditioning; the KV cache is kept (SPEC section 3)."""

    prompt: Prompt


class CutRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/cut``: a hard cut (new epoch); optionally the new scene's prompt."""

    prompt: Prompt | None = None


class ParamsRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/params``: attention bias to past frames and/or the denoising step list."""

    attention_bias: Annotated[float, msgspec.Meta(gt=0.0, le=1e6)] | None = None
    step_list: Annotated[list[Timestep], msgspec.Meta(min_length=1, max_length=32)] | None = None


class AppliesAt(msgspec.Struct, frozen=True, kw_only=True):
    chunk_index: int
    cache_epoch: int
    restart_generation: int


class IntentAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """Answer to an intent: where it takes effect (the next chunk boundary)."""

    request_id: str
    intents: list[str]
    applies_at: AppliesAt


class ApiError(msgspec.Struct, frozen=True, kw_only=True):
    error: str  # a stable code: invalid_json, invalid_field, body_too_large, unauthorized, ...
    detail: str
    field: str | None = None
    request_id: str | None = None


class BadRequest(Exception):
    def __init__(self, status: int, error: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.field = field


_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED = re.compile(r"(?:unknown|missing required) field `(?P<name>[^`]+)`")


def field_of(message: str) -> str | None:
    """The field a msgspec validation message is about (``step_list[0]``), if it names one."""
    m = _AT.search(message) or _NAMED.search(message)
    if m is None:
        return None
    return m.group("path") if "path" in m.groupdict() else m.group("name")


def decode_body(body: bytes, type_: type) -> object:
    """Decode a JSON request body into ``type_``; an empty body is ``{}``."""
    try:
        return msgspec.json.decode(body or b"{}", type=type_)
    except msgspec.ValidationError as exc:
        text = str(exc)
        return _raise(422, "invalid_field", text, field_of(text) or None)
    except msgspec.DecodeError as exc:
        return _raise(400, "invalid_json", f"body is not valid JSON: {exc}")


def _raise(status: int, error: str, detail: str, field: str | None = None):
    raise BadRequest(status, error, detail, field)
