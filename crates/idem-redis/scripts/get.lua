#!lua flags=no-writes
-- Reads a record with the server's time, so the caller can tell whether it is live.
--
-- KEYS[1]  the record's hash
--
-- Replies: {now} when there is no hash; otherwise {now, fingerprint, token, state,
-- lease_until, retention, expires_at, settled_at, response}, absent fields as ''.
local key = KEYS[1]

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local at = string.format('%.0f', now)

if redis.call('EXISTS', key) == 0 then
  return {at}
end
local f = redis.call('HMGET', key, 'fingerprint', 'token', 'state', 'lease_until', 'retention',
  'expires_at', 'settled_at', 'response')
local reply = {at}
for i = 1, 8 do
  reply[i + 1] = f[i] or ''
end
return reply
