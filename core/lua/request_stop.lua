-- A stop request for a session's reply in progress, stamped with Redis's clock (never a
-- server's, which may be skewed: the worker compares it with the message's Redis timestamp).
-- Needs the prelude lib_clock.lua.
-- KEYS[1] the session's stop key; ARGV[1] TTL (s), ARGV[2] control channel, ARGV[3] command
local now_us = now_stamp()
redis.call('SET', KEYS[1], string.format('%d', now_us), 'EX', ARGV[1])
redis.call('SPUBLISH', ARGV[2], ARGV[3])
return now_us
