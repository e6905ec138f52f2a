-- One rate-limit check and, if allowed, its count: one atomic step.
-- Needs the preludes lib_clock.lua and lib_gcra.lua.
-- KEYS[1] rate key; ARGV[1] requests per period (0 = no limit), ARGV[2] period (ms)
-- Returns 0 allowed, else the wait in ms before a request would be allowed.
local now = now_ms()
local wait, tat = gcra_check(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
if wait > 0 then
  return wait
end
gcra_commit(KEYS[1], tat, now)
return 0
