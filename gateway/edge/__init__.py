"""The HTTP edge: everything that takes a `web.Request` and answers it.

Wiring (`app`), sockets and drain (`server`), the one middleware (`boundary`), the choice
between a plain call and a task (`dispatch`), the pass-through (`proxy`), probes (`health`),
submitting a call as a task (`submit`), the task API (`task_api`), and kept answers sent back
(`replay`). The task engine under `gateway/tasks/` takes caller keys, ids and jobs, never a
request.
"""
