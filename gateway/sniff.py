"""Finding the model a request is for, to pick its deadline, without parsing whole bodies.

Small bodies are decoded exactly; large ones (chat calls carrying 100 MB of images put `model`
after `messages`) are scanned chunk by chunk as they stream upstream.
"""

from __future__ import annotations

import re

import msgspec

_MAX_MODEL_LEN = 128
# Gemini's model is in its path, under /v1beta or /v1 (google-genai's `api_version`).
_GEMINI_PATH = re.compile(r"^/v1(?:beta)?/models/([^/:]{1,128}):")
# Unescaped quotes: a `"model"` inside a JSON string value is written `\"model\"` and so is
# never mistaken for the key.
_JSON_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,128})"')
_MULTIPART_MODEL = re.compile(
    rb'name="?model"?(?:;[^\r\n]*)?\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]{1,128})\r\n'
)
# Enough bytes of one chunk to carry over so that a match split across two chunks is found.
_CARRY = 512


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
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        return model if model and len(model) <= _MAX_MODEL_LEN else None
    return ModelScanner(content_type).feed(body)


class ModelScanner:
    """Looks for the model in a body seen one chunk at a time."""

    __slots__ = ("_pattern", "_tail")

    def __init__(self, content_type: str) -> None:
        self._pattern = _MULTIPART_MODEL if content_type.startswith("multipart/") else _JSON_MODEL
        self._tail = b""

    def feed(self, chunk: bytes) -> str | None:
        window = self._tail + chunk[: _CARRY * 4] if self._tail else chunk
        match = self._pattern.search(window) or self._pattern.search(chunk)
        if match:
            return match.group(1).decode("utf-8", "replace")
        self._tail = chunk[-_CARRY:]
        return None
