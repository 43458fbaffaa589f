"""Async tasks: calls the gateway runs itself (`Prefer: respond-async`, run-once calls),
on the embedded store or Redis, by workers in any replica."""
