-- A worker starts a task: only a queued one, or an in-progress one whose queue entry was
-- reclaimed from a lost worker (`takeover`), so a duplicate queue entry never runs a task
-- twice; and only if the attempt is still the one the worker read (fencing).
local task_key = KEYS[1]
local events_key = KEYS[2]
local expected_attempt = ARGV[1]
local new_attempt = ARGV[2]
local event = ARGV[3]
local takeover = ARGV[4] == '1'
local entry_id = ARGV[5]  -- the queue entry this run holds: a cancel acknowledges it
local wake_channel = ARGV[6]
local task_id = ARGV[7]

local status = redis.call('HGET', task_key, 'status')
if status ~= 'queued' and not (status == 'in_progress' and takeover) then return false end
if redis.call('HGET', task_key, 'attempt') ~= expected_attempt then return false end
redis.call('HSET', task_key, 'status', 'in_progress', 'attempt', new_attempt, 'entry', entry_id)
local id = redis.call('RPUSH', events_key, event)
redis.call('PUBLISH', wake_channel, task_id)
return id
