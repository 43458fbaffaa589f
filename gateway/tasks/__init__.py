"""Async tasks: `Prefer: respond-async` calls run by the gateway itself (work in progress)."""
