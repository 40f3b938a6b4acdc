#!lua
-- Claims one record: idem_core::record::decide and idem_core::record::claim, atomically, on
-- the server's clock.
--
-- KEYS[1]  the record's key
-- ARGV[1]  the request's fingerprint (hex)
-- ARGV[2]  the lease (whole ms, >= 1)
-- ARGV[3]  the retention (whole ms, >= 1)
-- ARGV[4]  the holder nonce of this claim (hex, random per claim call)
--
-- Replies:
--   token                              an integer: acquired a fresh key, the lease running
--                                      until token / 1000 + lease
--   {'acquired', token, lease_until}
--   {'took_over', token, lease_until, previous_token, previous_lease_until}
--   {'completed', token, completed_at, expires_at, response}
--   {'in_flight', lease_until, now}    now: the server's time of this call
--   {'mismatch'}
--   {'corrupt', what}                  the stored record does not decode; nothing changed
-- (numbers as integers).
--
-- A claim whose answer was lost (the connection failed after the script ran) is sent again
-- with the same nonce: finding its own nonce on a record still in flight under a running
-- lease, the script answers with the lease that claim took instead of "in flight".
--
-- The common case, a fresh key, costs TIME and one SET NX that writes the record's short
-- form (see record.lua) with its expiry: the claim's arguments and the server's TIME as it
-- answered, joined, so only the expiry is computed and formatted, and the reply is a single
-- integer. When the key exists, the same SET (with GET) answers with the record instead.
local key = KEYS[1]
local fingerprint, holder = ARGV[1], ARGV[4]
local lease, retention = tonumber(ARGV[2]), tonumber(ARGV[3])
if #fingerprint ~= 64 or #holder ~= 32 then
  return redis.error_reply('idem: a fingerprint is 64 hex digits, a holder nonce 32')
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + floor(tonumber(time[2]) / 1000)
local stored = redis.pcall('SET', key,
  'c ' .. fingerprint .. ' ' .. holder .. ' ' .. time[1] .. ' ' .. time[2] .. ' ' .. ARGV[2]
    .. ' ' .. ARGV[3],
  'NX', 'GET', 'PXAT', format('%d', now + lease + retention))
if not stored then
  return now * 1000
end

-- The key exists (SET ... GET answered with its value, or refused a hash of an earlier
-- version): decide from the record it holds.
local r
if type(stored) == 'string' then
  r = from_string(stored)
elseif string.sub(stored.err, 1, 9) == 'WRONGTYPE' then
  r = from_hash(key)
else
  return stored
end
-- The token of the record this claim replaces, and what it takes over:
local previous, taken_over_until
local token, lease_until, expires_at, state = r.token, r.lease_until, r.expires_at, r.state
if not (r.fingerprint and token and lease_until and expires_at)
    or (state ~= 'in_flight' and state ~= 'completed' and state ~= 'released') then
  return {'corrupt', 'missing or malformed fields'}
end
if expires_at <= now or state == 'released' then
  previous = token
elseif state == 'in_flight' and r.holder == holder and lease_until > now then
  -- This claim's own earlier attempt, whose answer was lost.
  if r.taken_over_token and r.taken_over_lease_until then
    return {'took_over', token, lease_until, r.taken_over_token, r.taken_over_lease_until}
  end
  return {'acquired', token, lease_until}
elseif r.fingerprint ~= fingerprint then
  return {'mismatch'}
elseif state == 'completed' then
  if not (r.settled_at and r.response) then
    return {'corrupt', 'completed record without settled_at or response'}
  end
  return {'completed', token, r.settled_at, expires_at, r.response}
elseif lease_until > now then
  return {'in_flight', lease_until, now}
else
  previous = token
  taken_over_until = lease_until
end

token = now * 1000
if previous + 1 > token then
  token = previous + 1
end
if token >= 9007199254740992 then
  return redis.error_reply('idem: fencing token beyond 2^53')
end
lease_until = now + lease
local claimed = {
  state = 'in_flight',
  token = token,
  lease_until = lease_until,
  retention = retention,
  expires_at = lease_until + retention,
  fingerprint = fingerprint,
  holder = holder,
}
if taken_over_until then
  claimed.taken_over_token = previous
  claimed.taken_over_lease_until = taken_over_until
  store(key, claimed)
  return {'took_over', token, lease_until, previous, taken_over_until}
end
store(key, claimed)
return {'acquired', token, lease_until}
