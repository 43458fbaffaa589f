"""What a call asks for, as far as its price goes: model, images (`n`), size and quality.

Read from the fields alone, never the prompt or the images: a JSON body decoded into a struct of
four fields (msgspec skips the rest without making Python objects of it), a multipart edit's
form fields, or Gemini's path model with `generationConfig`.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator

import msgspec

# The routes whose calls are counted and priced; any other call is neither.
IMAGE_ROUTES = frozenset(
    (
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
    )
)
GEMINI_ROUTES = frozenset(
    (
        "/v1beta/models/{model}:generateContent",
        "/v1/models/{model}:generateContent",
        "/v1beta/models/{model}:streamGenerateContent",
        "/v1/models/{model}:streamGenerateContent",
    )
)
# Chat completions are counted (calls, tokens) and priced per image only for a model in
# [prices] (APIYI serves Gemini's image models there too); a text model costs nothing here.
CHAT_ROUTE = "/v1/chat/completions"
COUNTED_ROUTES = IMAGE_ROUTES | GEMINI_ROUTES | {CHAT_ROUTE}
# A caller's `n` beyond this is taken as this: OpenAI's own cap is 10. An `n` the gateway cannot
# read as a whole number ("10" as text, 10.5, true, a base64-encoded form field) is taken as this
# too: the upstream may read it as many images, and a budget held for one image would let
# concurrent calls spend many times their budget before any of them settles.
_MOST_IMAGES = 10


class Ask(msgspec.Struct, frozen=True):
    model: str | None
    images: int
    size: str | None
    quality: str | None
    # A chat completion: priced per image only for a model in [prices].
    chat: bool = False


class _OpenAIFields(msgspec.Struct):
    model: str | None = None
    # Kept raw, read by `_count`: an odd `n` must not cost the other fields.
    n: msgspec.Raw = msgspec.Raw()
    size: str | None = None
    quality: str | None = None


class _ImageConfig(msgspec.Struct):
    imageSize: str | None = None
    image_size: str | None = None


class _GenerationConfig(msgspec.Struct):
    candidateCount: msgspec.Raw = msgspec.Raw()
    candidate_count: msgspec.Raw = msgspec.Raw()
    imageConfig: _ImageConfig | None = None
    image_config: _ImageConfig | None = None


class _GeminiFields(msgspec.Struct):
    generationConfig: _GenerationConfig | None = None
    generation_config: _GenerationConfig | None = None


_openai = msgspec.json.Decoder(_OpenAIFields).decode
_gemini = msgspec.json.Decoder(_GeminiFields).decode
# Lax, as the upstream may be: "3", 3.0 and 3e0 are three images.
_whole = msgspec.json.Decoder(int | None, strict=False).decode
# A form field of a multipart body: its name (quoted or not, anywhere among the parameters, as
# multipart parsers read it), then the first line of its value.
_FORM_FIELD = re.compile(
    rb"content-disposition:[ \t]*form-data[^\r\n]*?;[ \t]*"
    rb'name=(?:"(model|n|size|quality)"|(model|n|size|quality))(?=[ \t;\r])[^\r\n]*\r\n'
    rb"(?:[^\r\n]*\r\n)*?\r\n([^\r\n]{0,100})\r\n",
    re.IGNORECASE,
)
_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^";\s]+))', re.IGNORECASE)
# How far past a part's delimiter the end of its headers is looked for.
_PART_HEAD = 4096
_HEAD_END = re.compile(rb"\r\n\r\n")
_LINE_END = re.compile(rb"[ \t]*\r\n")

Body = bytes | bytearray | memoryview | mmap.mmap


def ask_of(route: str, model: str | None, content_type: str, body: Body) -> Ask:
    """What the call asks for. `model`: as the gateway found it (path or body); a body that
    cannot be read for these fields asks for one image of that model at its default price."""
    mime = content_type.partition(";")[0].strip().lower()
    try:
        if route in GEMINI_ROUTES:
            return _gemini_ask(model, body)
        if mime == "multipart/form-data":
            return _form_ask(model, body, _fields_of(content_type, body))
        fields = _openai(body) if body else _OpenAIFields()
    except msgspec.ValidationError:
        # JSON the upstream may still take, with a field of an odd type: the most it can make.
        return Ask(model, _MOST_IMAGES, None, None, route == CHAT_ROUTE)
    except (msgspec.DecodeError, RecursionError):
        # Not JSON: the upstream refuses it, at no cost.
        return Ask(model, 1, None, None, route == CHAT_ROUTE)
    chat = route == CHAT_ROUTE
    return Ask(fields.model or model, _count(fields.n), fields.size, fields.quality, chat)


def _gemini_ask(model: str | None, body: Body) -> Ask:
    fields = _gemini(body) if body else _GeminiFields()
    config = fields.generationConfig or fields.generation_config or _GenerationConfig()
    image = config.imageConfig or config.image_config or _ImageConfig()
    count = config.candidateCount if len(config.candidateCount) else config.candidate_count
    return Ask(model, _count(count), image.imageSize or image.image_size, None)


def _fields_of(content_type: str, body: Body) -> Iterator[re.Match[bytes]]:
    """The form's fields: looked for just past each part's delimiter, never through a file's
    bytes (an edit's images are tens of MB: a case-blind scan of all of them held the event
    loop for 0.4 s per 50 MB, every other caller waiting). No boundary: the whole body."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        yield from _FORM_FIELD.finditer(body)
        return
    # Found by its literal text (fast), kept where it begins the body or a line, as a parser
    # reads it (RFC 2046: blanks may follow it).
    delimiter = re.compile(b"--" + re.escape((found[1] or found[2]).encode()))
    for part in delimiter.finditer(body):
        if part.start() and body[part.start() - 2 : part.start()] != b"\r\n":
            continue
        if (line := _LINE_END.match(body, part.end(), part.end() + 100)) is None:
            continue  # the closing delimiter, or not one
        head = _HEAD_END.search(body, line.end(), line.end() + _PART_HEAD)
        if head is None:
            continue
        # A field named in the part's own headers, read with its value's first line (the most
        # `_FORM_FIELD` reads); a file's bytes are never taken for a field.
        field = _FORM_FIELD.search(body, line.end(), head.end() + 102)
        if field is not None and field.start() < head.start():
            yield field


def _form_ask(model: str | None, body: Body, fields: Iterator[re.Match[bytes]]) -> Ask:
    found: dict[bytes, str] = {}
    images = 1
    for match in fields:
        name = (match[1] or match[2]).lower()
        value = match[3].decode("utf-8", "replace").strip()
        found.setdefault(name, value)
        if name == b"n":
            # A form with `n` twice: parsers differ on which one counts, so the larger does.
            images = max(images, _count(msgspec.Raw(value.encode())))
    return Ask(
        found.get(b"model") or model,
        images,
        found.get(b"size") or None,
        found.get(b"quality") or None,
    )


def _count(n: msgspec.Raw) -> int:
    """Images asked for by a raw `n` (JSON or a form field's text; empty when not given);
    unreadable: the most."""
    if not len(n):
        return 1
    try:
        asked = _whole(n)
    except msgspec.DecodeError:
        return _MOST_IMAGES
    return min(max(asked or 1, 1), _MOST_IMAGES)
