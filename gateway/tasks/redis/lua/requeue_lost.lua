-- Tasks run here whose replica stopped renewing their lease (killed, most likely) go to the
-- queue as entries that may take over a task in progress; a worker then runs them again.
-- KEYS: the set of holds, the queue stream. ARGV: the wake-up channel. Returns how many.
local here_key = KEYS[1]
local queue_key = KEYS[2]
local wake_channel = ARGV[1]
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

local lost = redis.call('ZRANGEBYSCORE', here_key, '-inf', now, 'LIMIT', 0, 100)
for _, task_id in ipairs(lost) do
  redis.call('XADD', queue_key, '*', 'task', task_id, 'takeover', '1')
  redis.call('ZREM', here_key, task_id)
end
if #lost > 0 then redis.call('PUBLISH', wake_channel, 'queue') end
return #lost
