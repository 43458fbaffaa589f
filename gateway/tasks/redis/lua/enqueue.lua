-- Queue a task at the end of its caller's line; refused (0) over the caller's caps unless
-- `check` is '0' (a task put back, already counted when it came). Wakes a waiting worker.
-- KEYS: the waiting set, the fair hash. ARGV: task id, caller, request bytes, most tasks and
-- most bytes a caller may have queued, check, the wake-up channel.
local order_key = KEYS[1]
local fair_key = KEYS[2]
local task_id = ARGV[1]
local caller = ARGV[2]
local size = tonumber(ARGV[3])
local max_count = tonumber(ARGV[4])
local max_bytes = tonumber(ARGV[5])
local check = ARGV[6] == '1'
local wake_channel = ARGV[7]

local count = tonumber(redis.call('HGET', fair_key, 'count:' .. caller) or '0')
local bytes = tonumber(redis.call('HGET', fair_key, 'bytes:' .. caller) or '0')
if check and (count >= max_count or bytes + size > max_bytes) then return 0 end
local served = tonumber(redis.call('HGET', fair_key, 'vt') or '0')
local last = tonumber(redis.call('HGET', fair_key, 'last:' .. caller) or '0')
local tag = math.max(served, last) + 1
redis.call('ZADD', order_key, tag, task_id)
redis.call('HSET', fair_key, 'last:' .. caller, tag, 'task:' .. task_id, caller .. ' ' .. size)
redis.call('HINCRBY', fair_key, 'count:' .. caller, 1)
redis.call('HINCRBY', fair_key, 'bytes:' .. caller, size)
redis.call('PUBLISH', wake_channel, 'queue')
return 1
