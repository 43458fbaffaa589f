-- A task ends (completed, failed or cancelled): status, result and event together, once.
-- With an attempt, only that run may end it (a worker fenced out by a takeover cannot).
-- On a standalone Redis a run's end also lets go of what the run held, once the task has
-- ended (by this run or another): its queue entry (or here-lease) and its concurrency slots.
-- In a Redis Cluster those are other slots' keys, let go of after (no KEYS past the 4th).
-- KEYS: the task's hash, job, result and events; then the queue stream, the set of
-- here-leases and the slots the run held. ARGV: see below; then the group and the run's entry.
-- Returns the event id and the queue entry of the run it ended ('' if none ran).
local task_key = KEYS[1]
local job_key = KEYS[2]
local result_key = KEYS[3]
local events_key = KEYS[4]
local attempt = ARGV[1]  -- '' for any run (a cancel, a lost worker)
local new_status = ARGV[2]
local error = ARGV[3]  -- '' for none
local event = ARGV[4]
local result = ARGV[5]  -- '' for none
local wake_channel = ARGV[6]  -- '' when the caller publishes after a replica has the end
local task_id = ARGV[7]

local function let_go()
  if #KEYS < 5 then return end
  local group, entry_id = ARGV[8], ARGV[9]
  if entry_id ~= '' then
    redis.call('XACK', KEYS[5], group, entry_id)
    redis.call('XDEL', KEYS[5], entry_id)
  else
    redis.call('ZREM', KEYS[6], task_id)
  end
  for i = 7, #KEYS do redis.call('ZREM', KEYS[i], task_id) end
end

local status = redis.call('HGET', task_key, 'status')
if not status then return false end
if status == 'completed' or status == 'failed' or status == 'cancelled' then
  let_go()
  return false
end
if attempt ~= '' then
  if status ~= 'in_progress' or redis.call('HGET', task_key, 'attempt') ~= attempt then
    return false
  end
end
local entry_id = ''
if status == 'in_progress' then entry_id = redis.call('HGET', task_key, 'entry') or '' end
redis.call('HSET', task_key, 'status', new_status)
if error ~= '' then redis.call('HSET', task_key, 'error', error) end
redis.call('HDEL', task_key, 'entry')
redis.call('DEL', job_key)
if result ~= '' then
  redis.call('SET', result_key, result, 'PX', math.max(redis.call('PTTL', task_key), 1))
end
local id = redis.call('RPUSH', events_key, event)
if wake_channel ~= '' then redis.call('PUBLISH', wake_channel, task_id .. ' ' .. new_status) end
let_go()
return {id, entry_id}
