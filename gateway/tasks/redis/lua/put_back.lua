-- A task whose concurrency slot was full waits again, at the end of its caller's line: its
-- stream entry done and the task queued in one step, so a crash between cannot lose it.
-- KEYS: the waiting set, the fair hash, the queue stream. ARGV: the entry id, the group, task
-- id, caller, request bytes, the wake-up channel, the task's packed limits.
redis.call('XACK', KEYS[3], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[3], ARGV[1])
enqueue(KEYS[1], KEYS[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), nil, ARGV[6], ARGV[7])
return 1
