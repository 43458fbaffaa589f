"""RFC 7240 `Prefer` parsing: what callers write is what the gateway understands."""

from __future__ import annotations

import pytest

from gateway.errors import BadRequest
from gateway.tasks.prefer import Preferences, parse_prefer


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], Preferences()),
        (["respond-async"], Preferences(respond_async=True)),
        (["Respond-Async"], Preferences(respond_async=True)),
        (["respond-async, wait=10"], Preferences(respond_async=True, wait_s=10.0)),
        (["wait=2.5", "RESPOND-ASYNC"], Preferences(respond_async=True, wait_s=2.5)),
        (['respond-async; foo=bar, wait="3"'], Preferences(respond_async=True, wait_s=3.0)),
        (["return=minimal, handling=lenient"], Preferences()),
        (['x-note="a, b", respond-async'], Preferences(respond_async=True)),
        (["wait=1, wait=99, respond-async"], Preferences(respond_async=True, wait_s=1.0)),
        ([" , respond-async ,, "], Preferences(respond_async=True)),
    ],
)
def test_preferences_are_read_as_rfc_7240_says(headers: list[str], expected: Preferences) -> None:
    assert parse_prefer(headers) == expected


@pytest.mark.parametrize("wait", ["soon", "-1", "nan", "inf", ""])
def test_a_bad_wait_is_a_clear_400(wait: str) -> None:
    with pytest.raises(BadRequest, match="wait"):
        parse_prefer([f"respond-async, wait={wait}"])
