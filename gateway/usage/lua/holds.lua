-- Library prepended to hold.lua and settle.lua: a client's budget holds.
-- holds_key: a hash, hold id -> "amount day month"; expiry_key: a sorted set, hold id -> the
-- time (ms) it lapses; held_key: a hash, "d:<day>" / "m:<month>" -> micro-dollars held then.

local function release(holds_key, expiry_key, held_key, id)
  local hold = redis.call('HGET', holds_key, id)
  if not hold then
    return
  end
  local amount, day, month = string.match(hold, '^(%d+) (%S+) (%S+)$')
  for _, field in ipairs({'d:' .. day, 'm:' .. month}) do
    if redis.call('HINCRBY', held_key, field, -tonumber(amount)) <= 0 then
      redis.call('HDEL', held_key, field)
    end
  end
  redis.call('HDEL', holds_key, id)
  redis.call('ZREM', expiry_key, id)
end

-- Holds whose replica died mid-call lapse: their amounts are free again.
local function sweep(holds_key, expiry_key, held_key, now_ms)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', expiry_key, '-inf', now_ms)) do
    release(holds_key, expiry_key, held_key, id)
  end
end

local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
