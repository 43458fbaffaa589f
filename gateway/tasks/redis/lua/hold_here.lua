-- A task run by the replica that holds its caller's connection has no queue entry; instead it
-- holds a lease in this sorted set (scored by expiry), renewed while it runs. A replica that
-- dies stops renewing, and `requeue_lost.lua` gives the task to the queue.
-- KEYS: the set. ARGV: the task id, the lease in ms, 'XX' to renew only a hold still there.
local here_key = KEYS[1]
local task_id = ARGV[1]
local lease_ms = ARGV[2]
local only_renew = ARGV[3] == 'XX'
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

if only_renew then
  return redis.call('ZADD', here_key, 'XX', 'CH', now + lease_ms, task_id)
end
return redis.call('ZADD', here_key, now + lease_ms, task_id)
