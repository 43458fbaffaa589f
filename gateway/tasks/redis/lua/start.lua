-- A worker starts a task: only a queued one, or an in-progress one whose queue entry was
-- reclaimed from a lost worker (`takeover`), so a duplicate queue entry never runs a task
-- twice. Read and changed in one step, so no other start comes between; a worker that read
-- the task before passes the attempt it read, and starts it only if it is still that one.
-- On a standalone Redis it takes the task's concurrency slots too (`slots.lua`): one round
-- trip; in a Redis Cluster they are another slot's keys, taken before (`acquire.lua`).
-- KEYS: the task hash, its events, its job, then the slots to take (none: taken already).
-- ARGV: see below, then the slots' lease in ms and each slot's limit in KEYS order.
-- Returns the new attempt, the task as created and its job; 0 if a slot is full; -1 if the
-- task keeps no start event (created by an older gateway: pass one); false if it is not this
-- run's to start.
local task_key = KEYS[1]
local events_key = KEYS[2]
local job_key = KEYS[3]
local expected_attempt = ARGV[1]  -- '' for whatever it is now
local event = ARGV[2]  -- '' for the one kept when the task was created
local takeover = ARGV[3] == '1'
local entry_id = ARGV[4]  -- the queue entry this run holds: a cancel acknowledges it
local wake_channel = ARGV[5]
local task_id = ARGV[6]

local status, attempt, record, started = unpack(
  redis.call('HMGET', task_key, 'status', 'attempt', 'record', 'started'))
if status ~= 'queued' and not (status == 'in_progress' and takeover) then return false end
if expected_attempt ~= '' and attempt ~= expected_attempt then return false end
local job = redis.call('GET', job_key)
if not job then return false end
if event == '' then event = started end
if not event then return -1 end
if #KEYS > 3 and not take_slots({unpack(KEYS, 4)}, task_id, ARGV[7], {unpack(ARGV, 8)}) then
  return 0
end
attempt = tonumber(attempt) + 1
redis.call('HSET', task_key, 'status', 'in_progress', 'attempt', attempt, 'entry', entry_id)
redis.call('RPUSH', events_key, event)
redis.call('PUBLISH', wake_channel, task_id .. ' in_progress')
return {attempt, record, job}
