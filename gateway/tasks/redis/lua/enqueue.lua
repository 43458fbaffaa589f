-- Queue a task at the end of its caller's line (`fair.lua`): 1, 0 over the caller's caps, -1
-- over all callers'. KEYS: the waiting set, the fair hash. ARGV: task id, caller, request
-- bytes, the four caps (`caps_at`), the wake-up channel ('' to wake no one: a worker of the
-- caller's replica is woken there), the task's packed limits.
return enqueue(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]), caps_at(ARGV, 4), ARGV[8],
               ARGV[9])
