-- A run-once call's name (`keys.once`): set unless held (or taken over with `replace`);
-- answers what it held.
-- KEYS: the name. ARGV: what it names (the task), its time to live in ms, '1' to replace.
if ARGV[3] == '1' then
  return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'GET')
end
return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX', 'GET')
