-- A worker's heartbeat in the live-workers set, on Redis's clock (the same clock
-- count_workers.lua counts live workers with); members silent too long are dropped.
-- Needs the prelude lib_clock.lua.
-- KEYS[1] live-workers sorted set; ARGV[1] consumer name, ARGV[2] forget after (ms)
local now = now_ms()
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return now
