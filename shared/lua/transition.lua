-- The one place a job's state changes: move a job to a new state if it is in an allowed one,
-- keeping the campaign's counters and the index of jobs with a worker exact. The allowed states
-- come from the caller's named move (kleinfarm.shared.states.TRANSITIONS); every key comes from
-- kleinfarm.shared.keys.
-- KEYS[1] job hash            KEYS[2] campaign hash       KEYS[3] pending zset
-- KEYS[4] campaign's paused zset                           KEYS[5] campaign's events channel
-- KEYS[6] worker's assigned zset ('' unless the move assigns or releases)
-- KEYS[7] active set (jobs assigned or running)            KEYS[8] delayed zset
-- ARGV[1] new state   ARGV[3] job id
-- ARGV[2] JSON {from: [states], attempt?: str, worker?: str, set?: {field: str},
--   enqueue?: job_id (re-add to the pending zset under the job's own score, or to the paused
--   zset while the campaign is paused),
--   delay_s?: str (with enqueue: wait in the delayed zset until Redis TIME + delay_s instead),
--   dequeue?: job_id (take it out of the pending zset first; not there means not changed),
--   assign?: {worker: str, estimate_s: str} (bump the attempt, record the worker, add the job to
--   the worker's assigned zset),
--   release?: true (take the job out of the worker's assigned zset: its slot is free)}
-- Returns {changed (1/0, -1 if no such job), previous state, open jobs left (-1 if unchanged),
--   attempt (after the change)}
local function bucket(state)
  if state == 'assigned' then return 'pending' end
  return state
end
local function terminal(state)
  return state == 'succeeded' or state == 'failed' or state == 'cancelled'
end
local job, campaign, pending, paused, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local assigned, active, delayed = KEYS[6], KEYS[7], KEYS[8]
local target, job_id = ARGV[1], ARGV[3]
local cond = cjson.decode(ARGV[2])
if cond['assign'] and (assigned == '' or not cond['dequeue']) then
  return redis.error_reply('an assignment names the worker\'s assigned zset and the job to dequeue')
end
if cond['release'] and assigned == '' then
  return redis.error_reply('a release names the worker\'s assigned zset')
end
-- A job leaving the queue is taken out of it first, even a stale entry whose job is gone:
-- whoever removes it owns the change.
if cond['dequeue'] and redis.call('ZREM', pending, cond['dequeue']) == 0 then return {0, '', -1, 0} end
local current = redis.call('HGET', job, 'state')
if not current then return {-1, '', -1, 0} end
local attempt = redis.call('HGET', job, 'attempt')
local allowed = false
for _, state in ipairs(cond['from']) do
  if state == current then allowed = true end
end
if not allowed then return {0, current, -1, attempt} end
if cond['attempt'] and cond['attempt'] ~= attempt then return {0, current, -1, attempt} end
if cond['worker'] and cond['worker'] ~= redis.call('HGET', job, 'worker') then return {0, current, -1, attempt} end
if cond['set'] then
  for field, value in pairs(cond['set']) do redis.call('HSET', job, field, value) end
end
if cond['assign'] then
  redis.call('HINCRBY', job, 'attempt', 1)
  redis.call('HSET', job, 'worker', cond['assign']['worker'])
  redis.call('ZADD', assigned, cond['assign']['estimate_s'], cond['dequeue'])
end
if cond['release'] then redis.call('ZREM', assigned, job_id) end
attempt = redis.call('HGET', job, 'attempt')
redis.call('HSET', job, 'state', target)
if target == 'assigned' or target == 'running' then
  redis.call('SADD', active, job_id)
else
  redis.call('SREM', active, job_id)
end
if cond['assign'] then
  -- Handing a job to a worker changes no counter and nothing a waiting client reports.
  return {1, current, -1, attempt}
end
local now = redis.call('TIME')
local now_s = now[1] + now[2] / 1e6
redis.call('HSET', campaign, 'changed_at', now_s)
if bucket(current) ~= bucket(target) then
  redis.call('HINCRBY', campaign, 'n_' .. bucket(current), -1)
  redis.call('HINCRBY', campaign, 'n_' .. bucket(target), 1)
end
if cond['enqueue'] and cond['delay_s'] then
  redis.call('ZADD', delayed, now_s + tonumber(cond['delay_s']), cond['enqueue'])
elseif cond['enqueue'] then
  local queue = pending
  if redis.call('HGET', campaign, 'paused') == '1' then queue = paused end
  redis.call('ZADD', queue, redis.call('HGET', job, 'score'), cond['enqueue'])
end
redis.call('PUBLISH', events, target)
local open = -1
if terminal(target) and not terminal(current) then
  open = redis.call('HINCRBY', campaign, 'open', -1)
elseif terminal(current) and not terminal(target) then
  redis.call('HINCRBY', campaign, 'open', 1)
end
return {1, current, open, attempt}
