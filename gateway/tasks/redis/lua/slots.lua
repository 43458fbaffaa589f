-- Shared by the scripts that take concurrency slots (prepended to each). A slot is a sorted set
-- of the tasks holding it, scored by lease expiry, so a dead worker's hold lapses by itself.

local function take_slots(slot_keys, task_id, lease_ms, limits)
  -- Every slot or none: false if one is full. A slot the task holds already counts as taken.
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  for i, slot_key in ipairs(slot_keys) do
    redis.call('ZREMRANGEBYSCORE', slot_key, '-inf', now)
    if not redis.call('ZSCORE', slot_key, task_id)
        and redis.call('ZCARD', slot_key) >= tonumber(limits[i]) then
      return false
    end
  end
  for _, slot_key in ipairs(slot_keys) do
    redis.call('ZADD', slot_key, now + lease_ms, task_id)
    redis.call('PEXPIRE', slot_key, lease_ms)
  end
  return true
end
