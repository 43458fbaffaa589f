-- A new task on a standalone Redis, in one step (its keys span Redis Cluster slots): started at
-- once for the idle worker its caller's replica set aside, if nothing waits ahead of it (no
-- task waiting in turn, no entry undelivered) and its concurrency slots are free; else queued
-- at the end of its caller's line, as `enqueue.lua` does. A task started at once has no queue
-- entry: like a task run here, it holds a lease in the set of here-leases while it runs.
-- KEYS: the task's hash, job and events; the waiting set, the fair hash, the queue stream,
-- the set of here-leases; then the slots it needs.
-- ARGV: 1-7 as `new_task`'s `args` (status 'queued', attempt 0); 8 the task id; 9 the caller;
-- 10 request bytes; 11-14 the queue's caps (`caps_at`); 15 the wake-up channel; 16 the packed
-- limits; 17 the group; 18 '1' if a worker is set aside for it (to start it at once if it can;
-- queued, it wakes no other: that worker looks at the queue); 19 the lease in ms; then each
-- slot's limit.
-- Returns 2 if started (attempt 1), 1 if queued, 0 over the caller's caps and -1 over all
-- callers' (nothing created).
local task_key, job_key, events_key = KEYS[1], KEYS[2], KEYS[3]
local order_key, fair_key, stream_key, here_key = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local task_id, wake_channel = ARGV[8], ARGV[15]
local set_aside = ARGV[18] == '1'
local lease_ms = tonumber(ARGV[19])

local function nothing_ahead()
  if redis.call('ZCARD', order_key) > 0 then return false end
  -- No group yet (a Redis that lost its data): nothing was delivered.
  local summary = redis.pcall('XPENDING', stream_key, ARGV[17])
  local pending = summary.err and 0 or summary[1]
  return redis.call('XLEN', stream_key) <= pending
end

if set_aside and nothing_ahead()
    and take_slots({unpack(KEYS, 8)}, task_id, lease_ms, {unpack(ARGV, 20)}) then
  local args = {unpack(ARGV, 1, 7)}
  args[5], args[6] = 'in_progress', 1  -- its first event says queued; then it starts
  new_task(task_key, job_key, events_key, args)
  redis.call('RPUSH', events_key, args[7])
  redis.call('ZADD', here_key, now_ms() + lease_ms, task_id)
  redis.call('PUBLISH', wake_channel, task_id .. ' in_progress')
  return 2
end
local queued = enqueue(order_key, fair_key, task_id, ARGV[9], tonumber(ARGV[10]),
                       caps_at(ARGV, 11), set_aside and '' or wake_channel, ARGV[16])
if queued ~= 1 then return queued end
new_task(task_key, job_key, events_key, {unpack(ARGV, 1, 7)})
return 1
