#!lua
-- Claims one record: idem_core::record::decide and idem_core::record::claim, atomically, on
-- the server's clock.
--
-- KEYS[1]  the record's hash
-- ARGV[1]  the request's fingerprint (hex)
-- ARGV[2]  the lease (whole ms, >= 1)
-- ARGV[3]  the retention (whole ms, >= 1)
-- ARGV[4]  the holder nonce of this claim (hex, random per claim call)
--
-- Replies, every number a decimal string:
--   {'acquired', token, lease_until}
--   {'took_over', token, lease_until, previous_token, previous_lease_until}
--   {'completed', token, completed_at, expires_at, response}
--   {'in_flight', lease_until}
--   {'mismatch'}
--   {'corrupt', what}                  the stored hash does not decode; nothing changed
--
-- A claim whose answer was lost (the connection failed after the script ran) is sent again
-- with the same nonce: finding its own nonce on a record still in flight under a running
-- lease, the script answers with the lease that claim took instead of "in flight".
--
-- The common case, a fresh key, costs TIME, EXISTS, HSET and PEXPIREAT: the record is read
-- only when the key exists, and the numbers this call computes (integers below 2^53) are
-- formatted once each with '%d', which is exact for them (Lua's %d takes a C long) and
-- cheaper than '%.0f'. Numbers copied from a previous record keep '%.0f', which never
-- wraps whatever that record holds.
local key = KEYS[1]
local fingerprint, holder = ARGV[1], ARGV[4]
local lease, retention = tonumber(ARGV[2]), tonumber(ARGV[3])

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

-- The token of the record this claim replaces, and what it takes over.
local previous, taken_over_until
local exists = redis.call('EXISTS', key) == 1
if exists then
  local f = redis.call('HMGET', key, 'fingerprint', 'token', 'state', 'lease_until',
    'expires_at', 'holder', 'taken_over_token', 'taken_over_lease_until', 'settled_at',
    'response')
  local token, lease_until, expires_at = tonumber(f[2]), tonumber(f[4]), tonumber(f[5])
  local state = f[3]
  if not (f[1] and token and lease_until and expires_at)
      or (state ~= 'in_flight' and state ~= 'completed' and state ~= 'released') then
    return {'corrupt', 'missing or malformed fields'}
  end
  if expires_at <= now or state == 'released' then
    previous = token
  elseif state == 'in_flight' and f[6] == holder and lease_until > now then
    -- This claim's own earlier attempt, whose answer was lost.
    if f[7] and f[8] then
      return {'took_over', f[2], f[4], f[7], f[8]}
    end
    return {'acquired', f[2], f[4]}
  elseif f[1] ~= fingerprint then
    return {'mismatch'}
  elseif state == 'completed' then
    if not (tonumber(f[9]) and f[10]) then
      return {'corrupt', 'completed record without settled_at or response'}
    end
    return {'completed', f[2], f[9], f[5], f[10]}
  elseif lease_until > now then
    return {'in_flight', f[4]}
  else
    previous = token
    taken_over_until = lease_until
  end
end

local token = now * 1000
if previous and previous + 1 > token then
  token = previous + 1
end
if token >= 9007199254740992 then
  return redis.error_reply('idem: fencing token beyond 2^53')
end
local lease_until = now + lease
local expires_at = lease_until + retention
local format = string.format
local token_s, lease_until_s = format('%d', token), format('%d', lease_until)
local expires_at_s = format('%d', expires_at)

if exists then
  redis.call('DEL', key)
end
if taken_over_until then
  local previous_s = format('%.0f', previous)
  local taken_over_until_s = format('%.0f', taken_over_until)
  redis.call('HSET', key, 'fingerprint', fingerprint, 'token', token_s, 'state', 'in_flight',
    'lease_until', lease_until_s, 'retention', format('%d', retention),
    'expires_at', expires_at_s, 'holder', holder,
    'taken_over_token', previous_s, 'taken_over_lease_until', taken_over_until_s)
  redis.call('PEXPIREAT', key, expires_at_s)
  return {'took_over', token_s, lease_until_s, previous_s, taken_over_until_s}
end
redis.call('HSET', key, 'fingerprint', fingerprint, 'token', token_s, 'state', 'in_flight',
  'lease_until', lease_until_s, 'retention', format('%d', retention),
  'expires_at', expires_at_s, 'holder', holder)
redis.call('PEXPIREAT', key, expires_at_s)
return {'acquired', token_s, lease_until_s}
