-- Prelude (prepended by load_script to the scripts that need the time): Redis's own clock in
-- ms since the epoch, so every server and worker agrees on it whatever their clocks say.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
