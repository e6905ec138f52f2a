-- Write a new session document with its TTL, in one step (a MULTI would do, but redis-py's
-- cluster client cannot read a JSON reply inside a transaction).
-- Needs the prelude lib_answered.lua: the document starts with its empty `$.answered` index.
-- KEYS[1] session document; ARGV[1] the document (JSON), ARGV[2] TTL (s)
redis.call('JSON.SET', KEYS[1], '$', ARGV[1])
new_index(KEYS[1])
return redis.call('EXPIRE', KEYS[1], ARGV[2])
