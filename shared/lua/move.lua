-- Move one job id between sorted sets, keeping its score (pause and resume of a campaign).
-- KEYS[1] from, KEYS[2] to; ARGV[1] job id. Returns 1 if moved, 0 if it was not in KEYS[1].
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], score, ARGV[1])
return 1
