-- A queued task cancelled: out of the waiting set and its caller's counts.
-- KEYS: the waiting set, the fair hash. ARGV: the task id.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then unqueued(KEYS[2], ARGV[1]) end
return 1
