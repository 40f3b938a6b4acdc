#!lua flags=no-writes
-- Reads a record with the server's time, so the caller can tell whether it is live.
--
-- KEYS[1]  the record's key
--
-- Replies: {now} when there is no record; otherwise {now, fingerprint, token, state,
-- lease_until, retention, expires_at, settled_at, response}, numbers as integers, absent
-- fields as ''.
local key = KEYS[1]

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + floor(tonumber(time[2]) / 1000)

local r = load(key)
if not r then
  return {now}
end
return {now, r.fingerprint or '', r.token or '', r.state or '', r.lease_until or '',
  r.retention or '', r.expires_at or '', r.settled_at or '', r.response or ''}
