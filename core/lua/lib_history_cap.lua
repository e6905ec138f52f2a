-- Prelude (prepended by load_script to the scripts that append to a history): keep at most
-- `max` messages in the document's `$.messages`, dropping the oldest, then any bot replies
-- left at the head whose question was dropped (so whole exchanges go where possible).
-- `length`: the array's length when the caller knows it (JSON.ARRAPPEND answers it), else nil.
-- Cost: JSON.ARRLEN unless `length` is given, and when over the cap a few JSON.GETs of single fields and one
-- JSON.ARRTRIM (which moves the kept elements: O(max)). 0 = no cap.
local function cap_history(key, max, length)
  if max <= 0 then
    return 0
  end
  if length == nil then
    length = redis.call('JSON.ARRLEN', key, '$.messages')[1]
  end
  if length == nil or length <= max then
    return 0
  end
  local drop = length - max
  -- At most a few orphaned replies can sit at the head (one per message in flight).
  local limit = math.min(length - 1, drop + 16)
  while drop < limit do
    local source = redis.call('JSON.GET', key, '$.messages[' .. drop .. '].source')
    if source ~= '["bot"]' then
      break
    end
    drop = drop + 1
  end
  redis.call('JSON.ARRTRIM', key, '$.messages', drop, length - 1)
  return drop
end
