"""Signed webhooks: a client's async tasks announce their end to the URL in its config.

`signing` (Standard Webhooks' headers), `events` (the event a task's end makes), `delivery`
(the loop every replica runs over the task store's outbox, `tasks/outbox.py`), `metrics`.
"""
