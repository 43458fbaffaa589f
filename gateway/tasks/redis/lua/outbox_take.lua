-- Due task ends to announce, each leased to the caller: its score becomes the lease's end,
-- which is also the token that settles it (`outbox_settle.lua`), so a deliverer whose lease
-- ran out changes nothing. Redis's clock: every replica's leases end alike.
-- KEYS: the outbox (a sorted set of task ids by when due), its state (a hash: per task id its
-- failed deliveries, client and event). ARGV: the lease in ms, the most to take, and when its
-- caller stops waiting (ms, Redis's clock): a take that runs later (Redis hung meanwhile)
-- takes nothing, else its entries would wait out a lease that nobody holds.
-- Returns how many entries the outbox holds, then per entry taken: its task id, lease,
-- failed deliveries, client and event ('' before its first delivery).
local outbox_key = KEYS[1]
local state_key = KEYS[2]
local lease_ms = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local cutoff_ms = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

local out = {redis.call('ZCARD', outbox_key)}
if now > cutoff_ms then return out end
local due = redis.call('ZRANGEBYSCORE', outbox_key, '-inf', now, 'LIMIT', 0, limit)
for _, task_id in ipairs(due) do
  redis.call('ZADD', outbox_key, now + lease_ms, task_id)
  local state = redis.call('HMGET', state_key, 'attempts:' .. task_id, 'client:' .. task_id,
                           'body:' .. task_id)
  table.insert(out, {task_id, now + lease_ms, state[1] or '0', state[2] or '', state[3] or ''})
end
return out
