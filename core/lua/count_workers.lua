-- How many workers sent a heartbeat within the lease, on Redis's clock (the clock
-- announce_worker.lua stamps heartbeats with), so no server's clock decides it.
-- Needs the prelude lib_clock.lua.
-- KEYS[1] live-workers sorted set; ARGV[1] worker lease (ms)
return redis.call('ZCOUNT', KEYS[1], now_ms() - tonumber(ARGV[1]), '+inf')
