-- Change a conversation (its session document) and tell its sockets, in one atomic step.
-- Needs the preludes lib_clock.lua and lib_answered.lua.
-- KEYS[1] session document, KEYS[2] the session's stop time
-- ARGV[1] the change: "title", "reset" or "deleted"; ARGV[2] the new title (JSON string, for
-- "title"); ARGV[3] session TTL (s); ARGV[4] events channel; ARGV[5] the conversation event
-- JSON; ARGV[6] the workers' control channel and ARGV[7] the stop command: "reset" and
-- "deleted" stop the reply in progress (as request_stop.lua does, on Redis's clock), so no
-- worker goes on generating for messages that are gone
-- "reset" lists the messages that were waiting for a reply in `$.cancelled` (the newest
-- CANCELLED_KEPT), so add_reply.lua does not store a reply to one of them, and empties the
-- history's `$.answered` index with it.
-- Returns 0 when the session does not exist, 1 when changed.
local CANCELLED_KEPT = 100

local function waiting_ids(key)
  local humans = cjson.decode(redis.call('JSON.GET', key, '$.messages[?(@.source=="human")].id'))
  local answered = {}
  for _, id in ipairs(cjson.decode(redis.call('JSON.GET', key, '$.messages[*].reply_to'))) do
    answered[id] = true
  end
  local previous = cjson.decode(redis.call('JSON.GET', key, '$.cancelled[*]'))
  local ids = {}
  for _, id in ipairs(previous) do table.insert(ids, id) end
  for _, id in ipairs(humans) do
    if not answered[id] then table.insert(ids, id) end
  end
  local kept = {}
  for i = math.max(1, #ids - CANCELLED_KEPT + 1), #ids do table.insert(kept, ids[i]) end
  return kept
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local change = ARGV[1]
if change == 'title' then
  redis.call('JSON.SET', KEYS[1], '$.title', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
elseif change == 'reset' then
  local cancelled = waiting_ids(KEYS[1])
  redis.call('JSON.SET', KEYS[1], '$.cancelled', #cancelled == 0 and '[]' or cjson.encode(cancelled))
  redis.call('JSON.SET', KEYS[1], '$.messages', '[]')
  redis.call('JSON.SET', KEYS[1], '$.unanswered', 0)
  new_index(KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
elseif change == 'deleted' then
  redis.call('DEL', KEYS[1])
else
  return redis.error_reply('unknown change ' .. change)
end
redis.call('SPUBLISH', ARGV[4], ARGV[5])
if change ~= 'title' then
  redis.call('SET', KEYS[2], string.format('%d', now_stamp()), 'EX', ARGV[3])
  redis.call('SPUBLISH', ARGV[6], ARGV[7])
end
return 1
