-- A run-once call's name is let go when its outcome is not kept for retries, but only if it
-- still names this task. KEYS: the name. ARGV: the value it holds for this task.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
