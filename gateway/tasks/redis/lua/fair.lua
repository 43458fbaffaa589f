-- Shared by the fair-queue scripts (prepended to each): waiting tasks sit in a sorted set
-- scored by a virtual start tag. A caller's next task is tagged one past the later of its own
-- last tag and the tag last served, so callers are served in turn: one with a single task
-- waits for at most one free worker, whatever another has queued. The hash `fair` keeps the
-- tag last served (`vt`), each caller's last tag, and what each caller has queued (counted
-- against its caps).

local function unqueued(fair_key, task_id)
  -- A task left the waiting set: it no longer counts against its caller's caps.
  local meta = redis.call('HGET', fair_key, 'task:' .. task_id)
  if not meta then return end
  local caller, size = string.match(meta, '^(.*) (%d+)$')
  redis.call('HDEL', fair_key, 'task:' .. task_id)
  if redis.call('HINCRBY', fair_key, 'count:' .. caller, -1) <= 0 then
    redis.call('HDEL', fair_key, 'count:' .. caller, 'bytes:' .. caller)
  else
    redis.call('HINCRBY', fair_key, 'bytes:' .. caller, -tonumber(size))
  end
end
