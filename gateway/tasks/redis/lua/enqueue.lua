-- Queue a task at the end of its caller's line (`fair.lua`); 0 over the caller's caps.
-- KEYS: the waiting set, the fair hash. ARGV: task id, caller, request bytes, most tasks and
-- most bytes a caller may have waiting, the wake-up channel ('' to wake no one: a worker of the
-- caller's replica is woken there), the task's packed limits.
local queued = enqueue(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
                       tonumber(ARGV[5]), true, ARGV[6], ARGV[7])
if queued then return 1 end
return 0
