-- A task that will announce its end, put in the outbox before it exists ('NX': due after a
-- delay, looked at then), or one that just ended made due now ('XX': only if it is there).
-- KEYS: the outbox. ARGV: the task id, the delay in ms, 'NX' or 'XX'.
local outbox_key = KEYS[1]
local task_id = ARGV[1]
local delay_ms = tonumber(ARGV[2])
local mode = ARGV[3]
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZADD', outbox_key, mode, now + delay_ms, task_id)
