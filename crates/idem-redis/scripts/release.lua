#!lua
-- Releases a held record: idem_core::record::release, atomically, on the server's clock. The
-- record stays as a tombstone that keeps the token until now + retention. Then publishes
-- that the record settled.
--
-- KEYS[1]  the record's key
-- ARGV[1]  the holder's token (decimal)
-- ARGV[2]  the nonce of this release call (hex)
-- ARGV[3]  PUBLISH or SPUBLISH
-- ARGV[4]  the channel
-- ARGV[5]  the message (the record id, hex)
--
-- Replies: {'ok'}; {'lost', current token or ''}; {'corrupt', what}.
-- A call sent again after its answer was lost finds its own nonce on the record it released
-- and answers 'ok' again.
local key = KEYS[1]
local token, nonce = tonumber(ARGV[1]), ARGV[2]

if #nonce ~= 32 then
  return redis.error_reply('idem: a nonce is 32 hex digits')
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + floor(tonumber(time[2]) / 1000)

local r = load(key)
if not r then
  return {'lost', ''}
end
if not (r.token and r.state and r.fingerprint and r.lease_until and r.expires_at
    and r.retention) then
  return {'corrupt', 'missing or malformed fields'}
end
if r.expires_at <= now then
  return {'lost', ''}
end
if r.token ~= token or r.state ~= 'in_flight' then
  if r.token == token and r.state == 'released' and r.settled_by == nonce then
    return {'ok'}
  end
  return {'lost', r.token}
end

r.state = 'released'
r.response = nil
r.settled_at = now
r.expires_at = now + r.retention
r.settled_by = nonce
store(key, r)
redis.call(ARGV[3], ARGV[4], ARGV[5])
return {'ok'}
