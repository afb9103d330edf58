-- Put a job whose backoff is over back in the queue, under its own score (not a state change: the
-- job is pending all along). KEYS[1] delayed zset, KEYS[2] job hash, KEYS[3] campaign hash,
-- KEYS[4] pending zset, KEYS[5] campaign's paused zset; ARGV[1] job id.
-- Returns 1 if queued, 0 if it was no longer waiting (cancelled, or promoted by another leader).
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], 'state') ~= 'pending' then return 0 end
local queue = KEYS[4]
if redis.call('HGET', KEYS[3], 'paused') == '1' then queue = KEYS[5] end
redis.call('ZADD', queue, redis.call('HGET', KEYS[2], 'score'), ARGV[1])
return 1
