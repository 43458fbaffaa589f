-- Prepended to each write that creates a task (`creation.py`): a write that reaches Redis after
-- the gateway stopped waiting for it (a hung Redis, resumed) does nothing, since its caller was
-- told to retry (or its call went upstream plainly) and must not pay for a run of it as well.
-- ARGV's last: the time (Redis's clock, ms) after which the write is refused; taken off, so the
-- script after this one sees its own arguments.
local fence_ms = tonumber(table.remove(ARGV))
local fence_time = redis.call('TIME')
if fence_time[1] * 1000 + math.floor(fence_time[2] / 1000) > fence_ms then
  return redis.error_reply('LATE the gateway stopped waiting for this write')
end
