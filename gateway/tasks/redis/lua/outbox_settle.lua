-- A taken entry settled by the deliverer that holds its lease: 'keep' its event (every later
-- try sends it unchanged), 'later' (due again after a delay, one failed delivery more if
-- `failed`), or 'drop' it (delivered, given up, nothing to announce).
-- KEYS: the outbox, its state. ARGV: the task id, the lease it was taken with, the action,
-- then for 'keep' the client and the event, for 'later' the delay in ms and '1' if failed.
-- Returns false when the lease is no longer the caller's.
local outbox_key = KEYS[1]
local state_key = KEYS[2]
local task_id = ARGV[1]
local lease = ARGV[2]
local action = ARGV[3]

local score = redis.call('ZSCORE', outbox_key, task_id)
if not score or tonumber(score) ~= tonumber(lease) then return false end
if action == 'keep' then
  redis.call('HSET', state_key, 'client:' .. task_id, ARGV[4], 'body:' .. task_id, ARGV[5])
elseif action == 'later' then
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  redis.call('ZADD', outbox_key, now + tonumber(ARGV[4]), task_id)
  if ARGV[5] == '1' then redis.call('HINCRBY', state_key, 'attempts:' .. task_id, 1) end
else
  redis.call('ZREM', outbox_key, task_id)
  redis.call('HDEL', state_key, 'attempts:' .. task_id, 'client:' .. task_id, 'body:' .. task_id)
end
return 1
