"""Finding the model a request is for, to pick its deadline, without parsing whole bodies.

Small bodies are decoded exactly; large ones (chat calls carrying 100 MB of images put `model`
after `messages`) are scanned chunk by chunk as they stream upstream.

Every scan is linear in the bytes it sees: the body is the caller's, and a pattern that
backtracks over it (a part header followed by any number of header lines) let one request
hold the event loop for minutes.
"""

from __future__ import annotations

import re

import msgspec

_MAX_MODEL_LEN = 128
# Gemini's model is in its path, under /v1beta or /v1 (google-genai's `api_version`).
_GEMINI_PATH = re.compile(r"^/v1(?:beta)?/models/([^/:]{1,128}):")
# Unescaped quotes: a `"model"` inside a JSON string value is written `\"model\"` and so is
# never mistaken for the key. The spaces are bounded so no match can run far.
_JSON_MODEL = re.compile(rb'"model"\s{0,64}:\s{0,64}"([^"\\]{1,128})"')
# A part's `name` parameter (`filename=` does not count), quoted or bare, up to the `;` or line
# end after it.
_PART_NAME = re.compile(rb'[;\s]name="?model"?[;\r]')
# A part's headers end within this many bytes of its name: nobody sends more.
_PART_HEADERS_MAX = 1024
# Enough bytes to carry over into the next chunk that a match split across chunks is found:
# a part's headers, its blank line and its value.
_CARRY = _PART_HEADERS_MAX + _MAX_MODEL_LEN + 64


class _ModelOnly(msgspec.Struct):
    model: str | None = None


_decode_model = msgspec.json.Decoder(_ModelOnly).decode


def model_from_path(path: str) -> str | None:
    match = _GEMINI_PATH.match(path)
    return match.group(1) if match else None


def model_from_body(content_type: str, body: bytes) -> str | None:
    """The model of a complete body: exact for JSON objects, pattern-matched for multipart."""
    if content_type.partition(";")[0].strip().lower() == "application/json":
        try:
            model = _decode_model(body).model
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return None  # not ours to refuse: the upstream says what is wrong with it
        return model if model and len(model) <= _MAX_MODEL_LEN else None
    return ModelScanner(content_type).feed(body)


def _json_model(data: bytes) -> str | None:
    match = _JSON_MODEL.search(data)
    return match.group(1).decode("utf-8", "replace") if match else None


def _multipart_model(data: bytes) -> str | None:
    """The value of the first part named `model`. Each blank line is searched for once,
    however many names stand before it, so the scan stays linear."""
    blank = -1
    for match in _PART_NAME.finditer(data):
        line_end = match.end() - 1
        if blank < line_end:
            blank = data.find(b"\r\n\r\n", line_end)
            if blank < 0:
                return None
        if blank - line_end > _PART_HEADERS_MAX:
            continue
        value = blank + 4
        end = data.find(b"\r\n", value, value + _MAX_MODEL_LEN + 2)
        if end > value:
            return data[value:end].decode("utf-8", "replace")
    return None


class ModelScanner:
    """Looks for the model in a body seen one chunk at a time."""

    __slots__ = ("_find", "_tail")

    def __init__(self, content_type: str) -> None:
        self._find = _multipart_model if content_type.startswith("multipart/") else _json_model
        self._tail = b""

    def feed(self, chunk: bytes) -> str | None:
        window = self._tail + chunk if self._tail else chunk
        self._tail = window[-_CARRY:]
        return self._find(window)
