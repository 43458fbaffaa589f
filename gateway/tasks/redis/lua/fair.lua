-- Shared by the fair-queue scripts (prepended to each): waiting tasks sit in a sorted set
-- scored by a virtual start tag. A caller's next task is tagged one past the later of its own
-- last tag and the tag last served, so callers are served in turn: one with a single task
-- waits for at most one free worker, whatever another has queued. The hash `fair` keeps the
-- tag last served (`vt`), each caller's last tag while it has tasks waiting, what each caller
-- has waiting and what all have (`count`, `bytes`: counted against the caps), and each waiting
-- task's concurrency slots (`limits`, packed by the gateway: the worker that takes the task
-- acquires them before it starts it).

local function unqueued(fair_key, task_id, meta)
  -- A task left the waiting set: it no longer counts against its caller's caps. `meta`: its
  -- `task:` field, when the caller read it already.
  meta = meta or redis.call('HGET', fair_key, 'task:' .. task_id)
  if not meta then return end
  local caller, size = string.match(meta, '^(.*) (%d+)$')
  redis.call('HDEL', fair_key, 'task:' .. task_id, 'limits:' .. task_id)
  if redis.call('HINCRBY', fair_key, 'count', -1) <= 0 then
    redis.call('HDEL', fair_key, 'count', 'bytes')
  elseif tonumber(size) > 0 then
    redis.call('HINCRBY', fair_key, 'bytes', -tonumber(size))
  end
  if redis.call('HINCRBY', fair_key, 'count:' .. caller, -1) <= 0 then
    -- Nothing of this caller waits: its tag is behind `vt` and need not be kept.
    redis.call('HDEL', fair_key, 'count:' .. caller, 'bytes:' .. caller, 'last:' .. caller)
  elseif tonumber(size) > 0 then
    redis.call('HINCRBY', fair_key, 'bytes:' .. caller, -tonumber(size))
  end
end

local function caps_at(args, first)
  -- The queue's caps, four arguments from `first`: most tasks and bytes one caller may have
  -- waiting, then all callers together.
  return {tonumber(args[first]), tonumber(args[first + 1]), tonumber(args[first + 2]),
          tonumber(args[first + 3])}
end

local function enqueue(order_key, fair_key, task_id, caller, size, caps, wake_channel, limits)
  -- Queue a task at the end of its caller's line: 1, or (unless `caps` is nil: a task put back
  -- was counted when it came) 0 over the caller's caps, -1 over everyone's.
  local count, bytes, served, last, all_count, all_bytes = unpack(
    redis.call('HMGET', fair_key, 'count:' .. caller, 'bytes:' .. caller, 'vt', 'last:' .. caller,
               'count', 'bytes'))
  count, bytes = tonumber(count or '0'), tonumber(bytes or '0')
  all_count, all_bytes = tonumber(all_count or '0'), tonumber(all_bytes or '0')
  if caps then
    if count >= caps[1] or bytes + size > caps[2] then return 0 end
    if all_count >= caps[3] or all_bytes + size > caps[4] then return -1 end
  end
  local tag = math.max(tonumber(served or '0'), tonumber(last or '0')) + 1
  redis.call('ZADD', order_key, tag, task_id)
  redis.call('HSET', fair_key, 'last:' .. caller, tag, 'task:' .. task_id, caller .. ' ' .. size,
             'limits:' .. task_id, limits, 'count:' .. caller, count + 1,
             'bytes:' .. caller, bytes + size, 'count', all_count + 1, 'bytes', all_bytes + size)
  if wake_channel ~= '' then redis.call('PUBLISH', wake_channel, 'queue') end
  return 1
end
