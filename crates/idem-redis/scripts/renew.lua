#!lua
-- Renews a held lease: idem_core::record::renew, atomically, on the server's clock.
-- lease_until = max(lease_until, now + lease); expires_at = lease_until + retention.
--
-- KEYS[1]  the record's hash
-- ARGV[1]  the holder's token (decimal)
-- ARGV[2]  the lease (ms, >= 1)
--
-- Replies: {'ok', lease_until}; {'lost', current token or ''}; {'corrupt', what}.
-- Sending it again after a lost answer is harmless: the lease only grows.
local key = KEYS[1]
local token, lease = ARGV[1], tonumber(ARGV[2])

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local function int(n)
  return string.format('%.0f', n)
end

local f = redis.call('HMGET', key, 'token', 'state', 'expires_at', 'retention', 'lease_until')
if not f[1] and redis.call('EXISTS', key) == 0 then
  return {'lost', ''}
end
local expires_at, retention, lease_until = tonumber(f[3]), tonumber(f[4]), tonumber(f[5])
if not (f[1] and f[2] and expires_at and retention and lease_until) then
  return {'corrupt', 'missing or malformed fields'}
end
if expires_at <= now then
  return {'lost', ''}
end
if f[1] ~= token or f[2] ~= 'in_flight' then
  return {'lost', f[1]}
end

if now + lease > lease_until then
  lease_until = now + lease
end
expires_at = lease_until + retention
redis.call('HSET', key, 'lease_until', int(lease_until), 'expires_at', int(expires_at))
redis.call('PEXPIREAT', key, int(expires_at))
return {'ok', int(lease_until)}
