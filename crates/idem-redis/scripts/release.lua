#!lua
-- Releases a held record: idem_core::record::release, atomically, on the server's clock. The
-- hash stays as a tombstone that keeps the token until now + retention. Then publishes that
-- the record settled.
--
-- KEYS[1]  the record's hash
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
local token, nonce = ARGV[1], ARGV[2]

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local function int(n)
  return string.format('%.0f', n)
end

local f = redis.call('HMGET', key, 'token', 'state', 'expires_at', 'retention', 'settled_by')
if not f[1] and redis.call('EXISTS', key) == 0 then
  return {'lost', ''}
end
local expires_at, retention = tonumber(f[3]), tonumber(f[4])
if not (f[1] and f[2] and expires_at and retention) then
  return {'corrupt', 'missing or malformed fields'}
end
if expires_at <= now then
  return {'lost', ''}
end
if f[1] ~= token or f[2] ~= 'in_flight' then
  if f[1] == token and f[2] == 'released' and f[5] == nonce then
    return {'ok'}
  end
  return {'lost', f[1]}
end

expires_at = now + retention
redis.call('HSET', key, 'state', 'released', 'settled_at', int(now),
  'expires_at', int(expires_at), 'settled_by', nonce)
redis.call('HDEL', key, 'response')
redis.call('PEXPIREAT', key, int(expires_at))
redis.call(ARGV[3], ARGV[4], ARGV[5])
return {'ok'}
