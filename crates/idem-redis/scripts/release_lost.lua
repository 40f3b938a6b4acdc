#!lua
-- Releases a record still held by a claim whose outcome was lost (idem_core::lost): only if
-- it is in flight under that claim's holder nonce, and only if that claim took a free
-- record. A record it took over from an earlier attempt stays in flight, as that attempt's
-- outcome is still unknown. Released as release.lua releases, then published.
--
-- KEYS[1]  the record's key
-- ARGV[1]  the lost claim's holder nonce (hex)
-- ARGV[2]  the nonce of this release call (hex)
-- ARGV[3]  PUBLISH or SPUBLISH
-- ARGV[4]  the channel
-- ARGV[5]  the message (the record id, hex)
--
-- Replies: {'released'}, or {'kept'} when there is nothing of the lost claim's to release.
local key = KEYS[1]
local holder, nonce = ARGV[1], ARGV[2]

if #holder ~= 32 or #nonce ~= 32 then
  return redis.error_reply('idem: a nonce is 32 hex digits')
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + floor(tonumber(time[2]) / 1000)

local r = load(key)
if not r or r.state ~= 'in_flight' or r.holder ~= holder or r.taken_over_token
    or not (r.token and r.fingerprint and r.lease_until and r.expires_at and r.retention)
    or r.expires_at <= now then
  return {'kept'}
end

r.state = 'released'
r.response = nil
r.settled_at = now
r.expires_at = now + r.retention
r.settled_by = nonce
store(key, r)
redis.call(ARGV[3], ARGV[4], ARGV[5])
return {'released'}
