-- Hand one pending job to a worker, unless another dispatcher took it first.
-- KEYS[1] pending zset, KEYS[2] job hash, KEYS[3] worker's assigned zset (member -> estimated seconds)
-- ARGV[1] job member, ARGV[2] worker name, ARGV[3] estimated seconds of work
-- Returns the new attempt number, or 0 if the job was no longer pending.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], 'state') ~= 'pending' then return 0 end
local attempt = redis.call('HINCRBY', KEYS[2], 'attempt', 1)
redis.call('HSET', KEYS[2], 'state', 'assigned', 'worker', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return attempt
