-- Prelude (prepended by load_script to add_human_message.lua and add_reply.lua): a session's
-- count of human messages waiting for a reply, kept in its document as `$.unanswered`: raised
-- by add_human_message.lua, lowered by add_reply.lua, so the backlog cap costs O(1), not a scan
-- of the history. Documents from before the counter count from 0.
-- The scripts read it with the other fields they need in one JSON.GET of several paths, whose
-- answer (decoded) maps each path to its matches: `read_fields` does that read.

-- The fields at `paths` of the document at `key`, decoded (path -> list of matches); nil when
-- the document does not exist. Give two paths or more: with several JSON.GET answers an
-- object, with one it would answer the bare list.
local function read_fields(key, paths)
  local raw = redis.call('JSON.GET', key, unpack(paths))
  if not raw then
    return nil
  end
  return cjson.decode(raw)
end

local function unanswered_of(fields)
  local matches = fields['$.unanswered']
  return (matches and tonumber(matches[1])) or 0
end
