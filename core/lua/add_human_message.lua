-- Store a human message and queue it for the workers, in one atomic step.
-- KEYS[1] session document, KEYS[2] request stream
-- ARGV[1] message JSON, ARGV[2] session TTL (s), ARGV[3] stream MAXLEN (approximate),
-- ARGV[4] token, ARGV[5] message id, ARGV[6] events channel, ARGV[7] ack event JSON
-- Returns the stream entry id, or false when the session does not exist (expired).
-- Idempotent: if the client retries after a lost reply, the message is not stored twice.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
if redis.call('JSON.GET', KEYS[1], '$.messages[?(@.id=="' .. ARGV[5] .. '")].id') ~= '[]' then
  return 'duplicate'
end
redis.call('JSON.ARRAPPEND', KEYS[1], '$.messages', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
local entry = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'token', ARGV[4], 'id', ARGV[5])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return entry
