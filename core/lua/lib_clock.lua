-- Prelude (prepended by load_script to the scripts that need the time): Redis's own clock, so
-- every server and worker agrees on it whatever their clocks say.

-- Milliseconds since the epoch.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The instant (epoch seconds, microseconds) as ISO 8601 UTC text
-- ("2026-01-31T12:00:00.123456Z", the form pydantic writes), for stamping messages.
local function stamp_text(secs, micros)
  local days = math.floor(secs / 86400)
  local rest = secs - days * 86400
  -- Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06dZ', year, month, day,
    math.floor(rest / 3600), math.floor(rest % 3600 / 60), rest % 60, micros)
end

-- Microseconds since the epoch and the same instant as ISO 8601 UTC text.
local function now_stamp()
  local t = redis.call('TIME')
  local secs, micros = tonumber(t[1]), tonumber(t[2])
  return secs * 1000000 + micros, stamp_text(secs, micros)
end

-- Milliseconds since the epoch and the same instant as ISO 8601 UTC text, from one TIME
-- (a script that needs both asks Redis once).
local function now_ms_and_stamp()
  local t = redis.call('TIME')
  local secs, micros = tonumber(t[1]), tonumber(t[2])
  return secs * 1000 + math.floor(micros / 1000), stamp_text(secs, micros)
end
