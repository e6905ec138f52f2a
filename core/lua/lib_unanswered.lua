-- Prelude (prepended by load_script to add_human_message.lua and add_reply.lua): a session's
-- count of human messages waiting for a reply, kept in its document as `$.unanswered`: raised
-- by add_human_message.lua, lowered by add_reply.lua, so the backlog cap costs O(1), not a scan
-- of the history. Documents from before the counter count from 0.
local function unanswered_count(key)
  local raw = redis.call('JSON.GET', key, '$.unanswered')
  return tonumber(string.match(raw or '', '%d+')) or 0
end
