-- Move one job to a new state if it is in an allowed one, keeping the campaign's counters true.
-- KEYS[1] job hash, KEYS[2] campaign hash, KEYS[3] pending zset
-- ARGV[1] new state, ARGV[2] JSON {from: [states], attempt?: str, worker?: str, set?: {field: str},
--   enqueue?: member (re-add the job to the pending zset under its own score)}
-- Returns {changed (1/0, -1 if no such job), previous state, open jobs left (-1 if unchanged)}
local function bucket(state)
  if state == 'assigned' then return 'pending' end
  return state
end
local function terminal(state)
  return state == 'succeeded' or state == 'failed' or state == 'cancelled'
end
local job, campaign = KEYS[1], KEYS[2]
local target = ARGV[1]
local cond = cjson.decode(ARGV[2])
local current = redis.call('HGET', job, 'state')
if not current then return {-1, '', -1} end
local allowed = false
for _, state in ipairs(cond['from']) do
  if state == current then allowed = true end
end
if not allowed then return {0, current, -1} end
if cond['attempt'] and cond['attempt'] ~= redis.call('HGET', job, 'attempt') then return {0, current, -1} end
if cond['worker'] and cond['worker'] ~= redis.call('HGET', job, 'worker') then return {0, current, -1} end
if cond['set'] then
  for field, value in pairs(cond['set']) do redis.call('HSET', job, field, value) end
end
redis.call('HSET', job, 'state', target)
local now = redis.call('TIME')
redis.call('HSET', campaign, 'changed_at', now[1] + now[2] / 1e6)
if bucket(current) ~= bucket(target) then
  redis.call('HINCRBY', campaign, 'n_' .. bucket(current), -1)
  redis.call('HINCRBY', campaign, 'n_' .. bucket(target), 1)
end
if cond['enqueue'] then
  -- A paused campaign's jobs wait in its own held set, out of the dispatcher's sight.
  local queue = KEYS[3]
  if redis.call('HGET', campaign, 'paused') == '1' then queue = campaign .. ':held' end
  redis.call('ZADD', queue, redis.call('HGET', job, 'score'), cond['enqueue'])
end
redis.call('PUBLISH', campaign .. ':events', target)
local open = -1
if terminal(target) and not terminal(current) then
  open = redis.call('HINCRBY', campaign, 'open', -1)
elseif terminal(current) and not terminal(target) then
  redis.call('HINCRBY', campaign, 'open', 1)
end
return {1, current, open}
