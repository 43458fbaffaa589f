-- Hold an amount against a client's daily and monthly budgets, or say which it would pass.
local day_key = KEYS[1]       -- hash: "spent" and the per-model counts of the client's day
local month_key = KEYS[2]     -- the same for its month
local holds_key = KEYS[3]
local expiry_key = KEYS[4]
local held_key = KEYS[5]
local id = ARGV[1]
local amount = tonumber(ARGV[2])
local day_budget = tonumber(ARGV[3])     -- 0: none
local month_budget = tonumber(ARGV[4])
local ttl_ms = tonumber(ARGV[5])
local day = ARGV[6]
local month = ARGV[7]
local keep_s = tonumber(ARGV[8])        -- how long the hold keys outlive their last use

local now = now_ms()
sweep(holds_key, expiry_key, held_key, now)
local checks = {
  {'day', day_key, 'd:' .. day, day_budget},
  {'month', month_key, 'm:' .. month, month_budget},
}
for _, check in ipairs(checks) do
  local spent = tonumber(redis.call('HGET', check[2], 'spent') or '0')
  local held = tonumber(redis.call('HGET', held_key, check[3]) or '0')
  if check[4] > 0 and spent + held + amount > check[4] then
    return {check[1], spent, held}
  end
end
redis.call('HSET', holds_key, id, amount .. ' ' .. day .. ' ' .. month)
redis.call('ZADD', expiry_key, now + ttl_ms, id)
redis.call('HINCRBY', held_key, 'd:' .. day, amount)
redis.call('HINCRBY', held_key, 'm:' .. month, amount)
for _, key in ipairs({holds_key, expiry_key, held_key}) do
  redis.call('EXPIRE', key, keep_s)
end
return false
