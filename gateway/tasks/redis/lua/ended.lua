-- What a run held goes once its task has ended, sent in the end's round trip on a standalone
-- Redis (its keys span Redis Cluster slots): its queue entry (or, for a task run here, its
-- lease) and its concurrency slots. Only if the task has ended: the end before it may have
-- been refused (a fenced-out run keeps what it holds until it lets go) or not run at all.
-- KEYS: the task hash, the queue stream, the set of here-leases, then the slots it held.
-- ARGV: the group, the run's entry id ('' for a task run here), the task id.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'completed' and status ~= 'failed' and status ~= 'cancelled' then return 0 end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
else
  redis.call('ZREM', KEYS[3], ARGV[3])
end
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], ARGV[3]) end
return 1
