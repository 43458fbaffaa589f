-- A new task (`task.lua`); one created to run here (a sync call, run by the replica holding its
-- caller) starts in progress.
-- KEYS: the task's hash, job and events. ARGV: as `new_task`'s `args`.
return new_task(KEYS[1], KEYS[2], KEYS[3], {unpack(ARGV, 1, 7)})
