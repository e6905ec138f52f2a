-- Count a new socket of a session, unless the session already has its maximum open.
-- KEYS[1] the session's sockets sorted set (member = socket id, score = lease expiry, ms)
-- ARGV[1] socket id, ARGV[2] maximum (0 = no limit), ARGV[3] lease (ms)
-- Sockets whose lease ran out (their server died without closing them) are dropped first.
-- Returns 1 counted, 0 refused. Needs the prelude lib_clock.lua.
local now = now_ms()
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local max = tonumber(ARGV[2])
if max > 0 and redis.call('ZCARD', KEYS[1]) >= max then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
