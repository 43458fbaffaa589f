-- A new task: its record, its job and its first event, all expiring together. A task created
-- to run here (a sync call, run by the replica holding its caller) starts in progress. It keeps
-- the event its start will append (`started`), so a start needs no read first.
local task_key = KEYS[1]
local job_key = KEYS[2]
local events_key = KEYS[3]
local record = ARGV[1]
local job = ARGV[2]
local event = ARGV[3]
local ttl_ms = ARGV[4]
local status = ARGV[5]  -- 'queued', or 'in_progress' for a task run here
local attempt = ARGV[6]
local started = ARGV[7]

redis.call('HSET', task_key, 'status', status, 'attempt', attempt, 'record', record,
           'started', started)
redis.call('PEXPIRE', task_key, ttl_ms)
redis.call('SET', job_key, job, 'PX', ttl_ms)
local id = redis.call('RPUSH', events_key, event)
redis.call('PEXPIRE', events_key, ttl_ms)
return id
