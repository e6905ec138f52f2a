-- Prelude (prepended by load_script to the scripts that add, answer or drop messages): a
-- session document's index of its questions. `$.answered` maps the id of each human message
-- in `$.messages` to false while it waits for its reply and to true once the reply (or the
-- error that stands for it) is stored. The duplicate check of add_human_message.lua and the
-- already-answered check of add_reply.lua are then one lookup each, where a scan of the
-- history (up to MAX_HISTORY_MESSAGES) cost Redis 0.3-0.5 ms at 1000 messages
-- (docs/benchmarks.md, "Issue 12, fifth pass").
-- A document holds `$.schema` = 2 once it has the index. One written before (no `$.schema`)
-- gets its index built from its history by the first script that meets it: one scan, once.

local SCHEMA = 2

local function answered_path(id)
  return '$.answered["' .. id .. '"]'
end

-- Give a new or emptied document an empty index.
local function new_index(key)
  redis.call('JSON.MSET', key, '$.answered', '{}', key, '$.schema', SCHEMA)
end

-- Build the index of a document written before it had one, from its history. Returns the
-- index (id -> answered) as a Lua table.
local function build_index(key)
  local index = {}
  for _, id in ipairs(cjson.decode(redis.call('JSON.GET', key,
      '$.messages[?(@.source=="human")].id'))) do
    index[id] = false
  end
  for _, id in ipairs(cjson.decode(redis.call('JSON.GET', key, '$.messages[*].reply_to'))) do
    index[id] = true
  end
  local encoded = next(index) == nil and '{}' or cjson.encode(index)
  redis.call('JSON.MSET', key, '$.answered', encoded, key, '$.schema', SCHEMA)
  return index
end

-- The state of question `id`, from `fields`: a read of `answered_path(id)` and `$.schema`
-- (the index is built first for a document that has none): nil not in the history, false
-- waiting, true answered.
local function question_state(key, fields, id)
  if #fields['$.schema'] == 0 then
    return build_index(key)[id]
  end
  return fields[answered_path(id)][1]
end

-- Drop the index entries of messages leaving the history (`ids`: the messages' ids and the
-- ids their replies answer; ids that are not in the index cost nothing).
local function forget_questions(key, ids)
  if #ids == 0 then
    return
  end
  local quoted = {}
  for i, id in ipairs(ids) do
    quoted[i] = '"' .. id .. '"'
  end
  redis.call('JSON.DEL', key, '$.answered[' .. table.concat(quoted, ',') .. ']')
end
