#!lua
-- Renews a held lease: idem_core::record::renew, atomically, on the server's clock.
-- lease_until = max(lease_until, now + lease); expires_at = lease_until + retention.
--
-- KEYS[1]  the record's key
-- ARGV[1]  the holder's token (decimal)
-- ARGV[2]  the lease (ms, >= 1)
--
-- Replies: {'ok', lease_until}; {'lost', current token or ''}; {'corrupt', what}.
-- Sending it again after a lost answer is harmless: the lease only grows.
local key = KEYS[1]
local token, lease = tonumber(ARGV[1]), tonumber(ARGV[2])

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
  return {'lost', r.token}
end

if now + lease > r.lease_until then
  r.lease_until = now + lease
end
r.expires_at = r.lease_until + r.retention
store(key, r)
return {'ok', r.lease_until}
