-- Let a hold go and count what the call made and cost; a hold id settles once.
local day_key = KEYS[1]
local month_key = KEYS[2]
local holds_key = KEYS[3]
local expiry_key = KEYS[4]
local held_key = KEYS[5]
local settled_key = KEYS[6]   -- sorted set: hold id -> until when it is remembered (ms)
local id = ARGV[1]            -- "": no hold
local once_ms = tonumber(ARGV[2])   -- 0: settle without remembering it
local count = ARGV[3] == '1'  -- 0: only let the hold go
local model = ARGV[4]
local cost = tonumber(ARGV[5])
local images = tonumber(ARGV[6])
local input_tokens = tonumber(ARGV[7])
local output_tokens = tonumber(ARGV[8])
local day_keep_s = tonumber(ARGV[9])
local month_keep_s = tonumber(ARGV[10])

if id ~= '' then
  local now = now_ms()
  if once_ms > 0 then
    redis.call('ZREMRANGEBYSCORE', settled_key, '-inf', now)
    if redis.call('ZSCORE', settled_key, id) then
      return 0
    end
    redis.call('ZADD', settled_key, now + once_ms, id)
    redis.call('PEXPIRE', settled_key, once_ms)
  end
  release(holds_key, expiry_key, held_key, id)
end
if count then
  for _, period in ipairs({{day_key, day_keep_s}, {month_key, month_keep_s}}) do
    local key = period[1]
    redis.call('HINCRBY', key, 'spent', cost)
    redis.call('HINCRBY', key, model .. '|calls', 1)
    redis.call('HINCRBY', key, model .. '|images', images)
    redis.call('HINCRBY', key, model .. '|input_tokens', input_tokens)
    redis.call('HINCRBY', key, model .. '|output_tokens', output_tokens)
    redis.call('HINCRBY', key, model .. '|cost', cost)
    redis.call('EXPIRE', key, period[2])
  end
end
return 1
