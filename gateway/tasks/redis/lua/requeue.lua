-- A task leaves its run for another worker at once (its replica is shutting down): a fresh
-- entry that may take it over, ahead of the waiting tasks, and a wake-up; the run's own entry
-- (if it had one) and its here-lease go.
-- KEYS: the queue stream, the set of here-leases. ARGV: the run's entry id ('' for a task run
-- here), the group, the task id, the wake-up channel, '1' to hand over or '0' only to let go,
-- the task's packed limits ('' when not known: its worker reads them from its job).
local stream_key = KEYS[1]
local here_key = KEYS[2]
local entry_id = ARGV[1]
local group = ARGV[2]
local task_id = ARGV[3]
local wake_channel = ARGV[4]
local hand_over = ARGV[5] == '1'
local limits = ARGV[6]

if hand_over then
  if limits ~= '' then
    redis.call('XADD', stream_key, '*', 'task', task_id, 'takeover', '1', 'limits', limits)
  else
    redis.call('XADD', stream_key, '*', 'task', task_id, 'takeover', '1')
  end
  redis.call('PUBLISH', wake_channel, 'queue')
end
if entry_id ~= '' then
  redis.call('XACK', stream_key, group, entry_id)
  redis.call('XDEL', stream_key, entry_id)
end
redis.call('ZREM', here_key, task_id)
return 1
