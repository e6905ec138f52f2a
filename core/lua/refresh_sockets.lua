-- Renew the leases of the sockets one server process holds, in one step.
-- KEYS[i] a session's sockets sorted set, ARGV[1] lease (ms), ARGV[i + 1] the socket id in KEYS[i]
-- Only sockets still counted are renewed (XX): one that was closed stays closed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease)
end
return #KEYS
