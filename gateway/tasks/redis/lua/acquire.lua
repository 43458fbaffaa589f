-- Take every concurrency slot a task needs, or none. A slot is a sorted set of the tasks
-- holding it, scored by lease expiry, so a dead worker's hold lapses by itself. All slots
-- share one hash tag, so taking several is one atomic step.
-- KEYS: the slots. ARGV: the task id, the lease in ms, then each slot's limit in KEYS order.
local task_id = ARGV[1]
local lease_ms = ARGV[2]
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

for i, slot_key in ipairs(KEYS) do
  local limit = tonumber(ARGV[2 + i])
  redis.call('ZREMRANGEBYSCORE', slot_key, '-inf', now)
  if not redis.call('ZSCORE', slot_key, task_id) and redis.call('ZCARD', slot_key) >= limit then
    return 0
  end
end
for _, slot_key in ipairs(KEYS) do
  redis.call('ZADD', slot_key, now + lease_ms, task_id)
  redis.call('PEXPIRE', slot_key, lease_ms)
end
return 1
