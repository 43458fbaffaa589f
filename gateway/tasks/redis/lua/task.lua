-- Shared by the scripts that create a task (prepended to each).

local function new_task(task_key, job_key, events_key, args)
  -- A new task: its record, its job and its first event, all expiring together. It keeps the
  -- event its start will append (`started`), so a start needs no read first.
  -- `args`: the record, the job, the first event, the time to live in ms, the status
  -- ('queued', or 'in_progress' for a task run here), the attempt, the started event.
  local record, job, event, ttl_ms, status, attempt, started = unpack(args)
  redis.call('HSET', task_key, 'status', status, 'attempt', attempt, 'record', record,
             'started', started)
  redis.call('PEXPIRE', task_key, ttl_ms)
  redis.call('SET', job_key, job, 'PX', ttl_ms)
  local id = redis.call('RPUSH', events_key, event)
  redis.call('PEXPIRE', events_key, ttl_ms)
  return id
end
