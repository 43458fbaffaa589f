"""What an answer says was made: its images and the upstream's `usage` tokens.

Fed the answer's bytes as they pass (a streamed answer is never held): images are counted by
their keys (`"b64_json"`, `"url"`, Gemini's `"inlineData"`; base64 and escaped JSON strings
cannot hold a quoted key), and the tokens are read from the `usage` object near the answer's
end (gpt-image's `usage`, a chat's, Gemini's `usageMetadata`), from the bytes last seen.
"""

from __future__ import annotations

import re

import msgspec

# Keys one image each has in an answer: OpenAI's data items, Gemini's inline parts; a streamed
# gpt-image answer's partial images carry `b64_json` too, and `partial_image_index`, so each of
# those takes one back.
_IMAGE_KEYS = re.compile(rb'"(b64_json|url|inlineData|inline_data|partial_image_index)"\s*:')
_PARTIAL = b"partial_image_index"
_USAGE_KEY = re.compile(rb'"(?:usage|usageMetadata|usage_metadata)"\s*:\s*\{')
# A key split between two chunks is found in the overlap kept from the one before.
_OVERLAP = 32
# The usage object is read from this many last bytes (it is a few hundred at most).
_TAIL = 4096


class Tokens(msgspec.Struct, frozen=True):
    input: int = 0
    output: int = 0


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    promptTokenCount: int | None = None
    candidatesTokenCount: int | None = None
    prompt_token_count: int | None = None
    candidates_token_count: int | None = None


_usage = msgspec.json.Decoder(_Usage).decode


class AnswerMeter:
    """Fed an answer's body, chunk by chunk; then what it made."""

    __slots__ = ("_images", "_tail", "sent")

    def __init__(self) -> None:
        self._images = 0
        self._tail = b""
        # Set as the call goes upstream: a caller gone before then (waiting for admission) left
        # nothing to bill; after, the upstream bills it all the same.
        self.sent = False

    def feed(self, chunk: bytes) -> None:
        overlap = self._tail[-_OVERLAP:]
        # Keys within the chunk, and keys begun in the bytes before it and ended in it.
        self._images += sum(_worth(key) for key in _IMAGE_KEYS.findall(chunk))
        joint = overlap + chunk[:_OVERLAP]
        self._images += sum(
            _worth(m[1]) for m in _IMAGE_KEYS.finditer(joint) if m.start() < len(overlap) < m.end()
        )
        self._tail = chunk[-_TAIL:] if len(chunk) >= _TAIL else (self._tail + chunk)[-_TAIL:]

    @property
    def images(self) -> int | None:
        """The images the answer holds; None when it names none (a chat's text, an error)."""
        return self._images if self._images > 0 else None

    @property
    def tokens(self) -> Tokens | None:
        """The upstream's token counts, if its answer's `usage` was within its last bytes."""
        found = None
        for found in _USAGE_KEY.finditer(self._tail):  # noqa: B007 (the last one is wanted)
            pass
        if found is None:
            return None
        start = found.end() - 1
        depth = 0
        for end in range(start, len(self._tail)):
            byte = self._tail[end]
            depth += (byte == 0x7B) - (byte == 0x7D)
            if depth == 0:
                break
        else:
            return None
        try:
            usage = _usage(self._tail[start : end + 1])
        except msgspec.DecodeError:
            return None
        return Tokens(
            input=usage.input_tokens
            or usage.prompt_tokens
            or usage.promptTokenCount
            or usage.prompt_token_count
            or 0,
            output=usage.output_tokens
            or usage.completion_tokens
            or usage.candidatesTokenCount
            or usage.candidates_token_count
            or 0,
        )


def _worth(key: bytes) -> int:
    return -1 if key == _PARTIAL else 1
