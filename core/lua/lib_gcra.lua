-- Prelude (prepended by load_script to the scripts that rate-limit; needs lib_clock.lua):
-- GCRA, the "generic cell rate algorithm". A key holds the theoretical arrival time (TAT, ms
-- since the epoch) of the next request; `limit` requests per `period_ms` are allowed, `limit`
-- of them at once. Every call is O(1): one GET, and one SET with a TTL when the request is
-- allowed.

-- Returns (wait_ms, new_tat): wait_ms > 0 means refused (try again in wait_ms).
-- `stored`: the key's value when the caller read it already (one MGET for several keys;
-- false when the key is missing), nil to have it read here.
local function gcra_check(key, limit, period_ms, now, stored)
  if limit <= 0 then
    return 0, nil
  end
  local interval = math.max(1, math.floor(period_ms / limit))
  if stored == nil then
    stored = redis.call('GET', key)
  end
  local tat = tonumber(stored) or now
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local wait = new_tat - now - period_ms
  if wait > 0 then
    return wait, nil
  end
  return 0, new_tat
end

local function gcra_commit(key, new_tat, now)
  if new_tat ~= nil then
    redis.call('SET', key, string.format('%d', new_tat), 'PX', math.max(1, new_tat - now))
  end
end
