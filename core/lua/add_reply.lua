-- Store a bot reply (or the error that stands for it) exactly once, then announce it.
-- Needs the preludes lib_history_cap.lua and lib_unanswered.lua.
-- KEYS[1] session document, KEYS[2] the session's worker lease, KEYS[3] the answered message's
-- generation-attempt counter (deleted once the message has its answer)
-- ARGV[1] lease owner, ARGV[2] id of the human message answered, ARGV[3] reply JSON,
-- ARGV[4] session TTL (s), ARGV[5] events channel, ARGV[6] event JSON,
-- ARGV[7] history cap (0 = none)
-- Returns 1 stored, 0 already answered, -1 the caller no longer holds the lease, -2 no session,
-- -3 the message was waiting when the history was reset (change_conversation.lua lists it in
-- `$.cancelled`): its reply is not stored. (A message dropped by the history cap while its
-- reply was generated still gets the reply stored: its sockets are waiting for it.)
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -2
end
-- One scan for both: the question's source ("human") and any reply's ("bot").
local sources = redis.call(
  'JSON.GET', KEYS[1], '$.messages[?(@.id=="' .. ARGV[2] .. '" || @.reply_to=="' .. ARGV[2] .. '")].source'
)
if string.find(sources, '"bot"', 1, true) then
  redis.call('DEL', KEYS[3])
  return 0
end
if not string.find(sources, '"human"', 1, true)
  and redis.call('JSON.GET', KEYS[1], '$.cancelled[?(@=="' .. ARGV[2] .. '")]') ~= '[]' then
  redis.call('DEL', KEYS[3])
  return -3
end
redis.call('JSON.ARRAPPEND', KEYS[1], '$.messages', ARGV[3])
redis.call('JSON.SET', KEYS[1], '$.unanswered', math.max(0, unanswered_count(KEYS[1]) - 1))
cap_history(KEYS[1], tonumber(ARGV[7] or '0'))
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[6])
redis.call('DEL', KEYS[3])
return 1
