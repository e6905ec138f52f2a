-- Store a bot reply (or the error that stands for it) exactly once, then announce it; with an
-- entry id (ARGV[9]), also finish that request-stream entry in the same step: release the
-- lease, then acknowledge and delete the entry (the worker's last turn for the entry, so one
-- round trip instead of two).
-- Needs the preludes lib_unanswered.lua, lib_answered.lua and lib_history_cap.lua.
-- KEYS[1] session document, KEYS[2] the session's worker lease, KEYS[3] the answered message's
-- generation-attempt counter (deleted once the message has its answer), KEYS[4] the request
-- stream (touched only with ARGV[9])
-- ARGV[1] lease owner, ARGV[2] id of the human message answered, ARGV[3] reply JSON,
-- ARGV[4] session TTL (s), ARGV[5] events channel, ARGV[6] event JSON,
-- ARGV[7] history cap (0 = none), ARGV[8] the workers' consumer group, ARGV[9] the entry to
-- finish ("" = none: the lease stays held and the entry pending), ARGV[10] the reply's last
-- `token` event, published to ARGV[5] whatever the outcome but -1 ("" = none): with a stored
-- reply, in the same message as its event and before it (the two events joined by a newline,
-- which no event's compact JSON holds; server/hub.py splits them), so one SPUBLISH instead of
-- two
-- Returns 1 stored, 0 already answered, -1 the caller no longer holds the lease (nothing
-- written, not even the entry finished: it belongs to the lease's new holder), -2 no session,
-- -3 the message was waiting when the history was reset (change_conversation.lua lists it in
-- `$.cancelled`): its reply is not stored. (A message dropped by the history cap while its
-- reply was generated still gets the reply stored: its sockets are waiting for it.)
-- With ARGV[9], every outcome but -1 finishes the entry.
-- Cost of a stored reply that finishes its entry: GET, JSON.GET (the answered check is a
-- lookup in `$.answered`, lib_answered.lua), JSON.ARRAPPEND, JSON.MSET, EXPIRE, SPUBLISH
-- (with ARGV[10] if given), one DEL of the counter and the lease, XACKDEL (XACK + XDEL before
-- Redis 8.2).
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end

local function finish(outcome)
  if outcome ~= 1 and ARGV[10] ~= '' then
    redis.call('SPUBLISH', ARGV[5], ARGV[10])
  end
  if ARGV[9] == '' then
    redis.call('DEL', KEYS[3])
    return outcome
  end
  redis.call('DEL', KEYS[3], KEYS[2])
  local acked = redis.pcall('XACKDEL', KEYS[4], ARGV[8], 'IDS', 1, ARGV[9])
  if type(acked) == 'table' and acked.err then
    redis.call('XACK', KEYS[4], ARGV[8], ARGV[9])
    redis.call('XDEL', KEYS[4], ARGV[9])
  end
  return outcome
end

-- The question's entry in the document's index (lib_answered.lua): one lookup, not a scan.
local question = answered_path(ARGV[2])
local fields = read_fields(KEYS[1], {question, '$.schema', '$.unanswered'})
if fields == nil then
  return finish(-2)
end
local state = question_state(KEYS[1], fields, ARGV[2])
if state == true then
  return finish(0)
end
if state == nil
  and redis.call('JSON.GET', KEYS[1], '$.cancelled[?(@=="' .. ARGV[2] .. '")]') ~= '[]' then
  return finish(-3)
end
local length = redis.call('JSON.ARRAPPEND', KEYS[1], '$.messages', ARGV[3])[1]
-- The entry is written even when the question has left the history (the cap dropped it while
-- its reply was generated), so a retried call still finds the reply stored; it leaves the
-- index with the reply (lib_history_cap.lua drops the entries its replies answer too).
redis.call('JSON.MSET', KEYS[1], '$.unanswered', math.max(0, unanswered_of(fields) - 1),
  KEYS[1], question, 'true')
cap_history(KEYS[1], tonumber(ARGV[7] or '0'), length)
redis.call('EXPIRE', KEYS[1], ARGV[4])
local events = ARGV[6]
if ARGV[10] ~= '' then
  events = ARGV[10] .. '\n' .. ARGV[6]
end
redis.call('SPUBLISH', ARGV[5], events)
return finish(1)
