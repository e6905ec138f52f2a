-- Prelude (prepended by load_script to the scripts that append to a history; needs
-- lib_unanswered.lua and lib_answered.lua): keep at most `max` messages in the document's `$.messages`, dropping the
-- oldest, then any bot replies left at the head whose question was dropped (so whole
-- exchanges go where possible), and the dropped questions' entries in `$.answered`.
-- `length`: the array's length when the caller knows it (JSON.ARRAPPEND answers it), else nil.
-- Cost: JSON.ARRLEN unless `length` is given; when over the cap, one JSON.GET of the sources
-- at the head, one of the dropped messages' ids, one JSON.DEL of their index entries and one
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
  if drop < limit then
    local head = '$.messages[' .. drop .. ':' .. limit .. '].source'
    for _, source in ipairs(cjson.decode(redis.call('JSON.GET', key, head))) do
      if source ~= 'bot' then
        break
      end
      drop = drop + 1
    end
  end
  local dropped = '$.messages[0:' .. drop .. ']'
  local fields = read_fields(key, {dropped .. '.id', dropped .. '.reply_to'})
  local ids = fields[dropped .. '.id']
  for _, id in ipairs(fields[dropped .. '.reply_to']) do
    table.insert(ids, id)
  end
  forget_questions(key, ids)
  redis.call('JSON.ARRTRIM', key, '$.messages', drop, length - 1)
  return drop
end
