-- Take every concurrency slot a task needs, or none (`slots.lua`). All slots share one hash
-- tag, so taking several is one atomic step.
-- KEYS: the slots. ARGV: the task id, the lease in ms, then each slot's limit in KEYS order.
if take_slots(KEYS, ARGV[1], ARGV[2], {unpack(ARGV, 3)}) then return 1 end
return 0
