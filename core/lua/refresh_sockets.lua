-- Renew the leases of the sockets one server process holds, in one step.
-- KEYS[i] a session's sockets sorted set, ARGV[1] lease (ms), ARGV[i + 1] the socket id in KEYS[i]
-- Only sockets still counted are renewed (XX): one that was closed stays closed.
-- Needs the prelude lib_clock.lua.
local now = now_ms()
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease)
end
return #KEYS
