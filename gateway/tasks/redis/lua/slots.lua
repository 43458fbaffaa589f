-- Shared by the scripts that take concurrency slots (prepended to each). A slot is a sorted set
-- of the tasks holding it, scored by lease expiry, so a dead worker's hold lapses by itself.

local function now_ms()
  -- Redis's clock, not a gateway's: every replica scores leases alike.
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

local function take_slots(slot_keys, task_id, lease_ms, limits)
  -- Every slot or none: false if one is full. A slot the task holds already counts as taken.
  -- Lapsed holds are counted out, then removed after the ZADD: a script's first write must be
  -- one a full Redis refuses (a removal is not), or the whole script would write past its
  -- maxmemory.
  local now = now_ms()
  for i, slot_key in ipairs(slot_keys) do
    local held = tonumber(redis.call('ZSCORE', slot_key, task_id) or '0')
    if held <= now and redis.call('ZCOUNT', slot_key, '(' .. now, '+inf') >= tonumber(limits[i]) then
      return false
    end
  end
  for _, slot_key in ipairs(slot_keys) do
    redis.call('ZADD', slot_key, now + lease_ms, task_id)
    redis.call('ZREMRANGEBYSCORE', slot_key, '-inf', now)
    redis.call('PEXPIRE', slot_key, lease_ms)
  end
  return true
end
