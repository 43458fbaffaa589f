-- Extend a running task's hold on its slots by a lease. KEYS: the slots.
local task_id = ARGV[1]
local lease_ms = ARGV[2]
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

for _, slot_key in ipairs(KEYS) do
  redis.call('ZADD', slot_key, 'XX', now + lease_ms, task_id)
  redis.call('PEXPIRE', slot_key, lease_ms)
end
