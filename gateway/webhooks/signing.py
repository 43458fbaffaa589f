"""Standard Webhooks signatures (https://www.standardwebhooks.com), as openai-python's
`client.webhooks.unwrap(body, headers, secret=...)` verifies them: HMAC-SHA256, keyed with the
base64-decoded part of a "whsec_" secret, over "{webhook-id}.{webhook-timestamp}.{body}"."""

from __future__ import annotations

import base64
import hashlib
import hmac


def secret_key(secret: str) -> bytes:
    """The signing key of a "whsec_" secret (checked at start-up: `config.is_webhook_secret`)."""
    return base64.b64decode(secret.removeprefix("whsec_"), validate=True)


def signed_headers(key: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers of one delivery. The timestamp is the try's own (receivers refuse
    one older than a few minutes), the id the event's (receivers drop repeats by it)."""
    signed = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": f"v1,{signature}",
    }
