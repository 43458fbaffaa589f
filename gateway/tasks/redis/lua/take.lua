-- A worker takes its next entry: one already in the stream (a task handed over or reclaimed,
-- which runs first), else the next waiting task in turn, moved into the stream with its
-- concurrency slots. Delivered to this consumer either way, so it stays pending (its lease)
-- until the task ends.
-- KEYS: the waiting set, the fair hash, the queue stream. ARGV: the group, the consumer.
-- Returns {entry id, task id, takeover, packed limits or false if the entry has none, how
-- many tasks still wait (-1: not counted)}, or nothing.
local order_key = KEYS[1]
local fair_key = KEYS[2]
local stream_key = KEYS[3]
local group = ARGV[1]
local consumer = ARGV[2]

local function read(left)
  local got = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream_key, '>')
  if not got then return nil end
  local entry = got[1][2][1]
  local fields, task_id, takeover, limits = entry[2], nil, '0', false
  for i = 1, #fields, 2 do
    if fields[i] == 'task' then task_id = fields[i + 1] end
    if fields[i] == 'takeover' then takeover = fields[i + 1] end
    if fields[i] == 'limits' then limits = fields[i + 1] end
  end
  return {entry[1], task_id, takeover, limits, left}
end

local entry = read(-1)
if entry then return entry end
local popped = redis.call('ZPOPMIN', order_key)
if #popped == 0 then return nil end
local task_id = popped[1]
redis.call('HSET', fair_key, 'vt', popped[2])
local meta, limits = unpack(redis.call('HMGET', fair_key, 'task:' .. task_id, 'limits:' .. task_id))
unqueued(fair_key, task_id, meta)
if limits then
  redis.call('XADD', stream_key, '*', 'task', task_id, 'takeover', '0', 'limits', limits)
else
  redis.call('XADD', stream_key, '*', 'task', task_id, 'takeover', '0')
end
return read(redis.call('ZCARD', order_key))
