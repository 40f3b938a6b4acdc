-- Reading and writing a record. Every script starts with this (the store puts it after the
-- script's first line).
--
-- A record is one string, in one of two forms. A claim on a fresh key writes the short form
-- with a single SET NX, by concatenation alone:
--
--   'c <fingerprint: 64 hex> <holder: 32 hex> <seconds> <microseconds> <lease> <retention>'
--
-- the claim's arguments and the server's TIME when it ran: state in_flight, token
-- now_ms * 1000, lease_until now_ms + lease, expires_at lease_until + retention. Every
-- other write stores the full form, fixed fields then the response:
--
--   byte 1        'f'
--   byte 2        the state: 'i' in_flight, 'c' completed, 'r' released
--   bytes 3-66    the fingerprint (64 hex digits)
--   bytes 67-98   the holder nonce (32 hex digits, or 32 '-' for none)
--   bytes 99-130  the settled_by nonce (likewise)
--   bytes 131-186 token, lease_until, retention, expires_at, settled_at, taken_over_token,
--                 taken_over_lease_until: big-endian IEEE doubles (struct '>d'), -1 for none
--   bytes 187-    the response (completed records)
--
-- Fixed places make reading and writing a matter of slicing and joining, with no text to
-- parse or numbers to format. Earlier versions stored a hash with one field per value;
-- load() reads those too, and the next write replaces the hash.
--
-- Every number in a record is a whole number of milliseconds (or a token) below 2^53, where
-- Lua's numbers (and doubles) are exact; a record holding anything else reads as corrupt.

local format = string.format
local floor = math.floor
-- A nonce field without a nonce.
local NO_NONCE = '--------------------------------'

-- Whether every argument (a number or nil) is nil or a whole number in [0, 2^53); false for
-- NaN and the infinities. One call checks a record's numbers (a call per number would cost
-- more than the decoding).
local function wholes(a, b, c, d, e, f, g)
  local L = 9007199254740992
  if (a ~= nil and not (a >= 0 and a < L and a % 1 == 0))
      or (b ~= nil and not (b >= 0 and b < L and b % 1 == 0))
      or (c ~= nil and not (c >= 0 and c < L and c % 1 == 0))
      or (d ~= nil and not (d >= 0 and d < L and d % 1 == 0))
      or (e ~= nil and not (e >= 0 and e < L and e % 1 == 0))
      or (f ~= nil and not (f >= 0 and f < L and f % 1 == 0))
      or (g ~= nil and not (g >= 0 and g < L and g % 1 == 0)) then
    return false
  end
  return true
end

-- The fields of a record stored as a string; an empty table when the string is not one.
local function from_string(s)
  local kind = string.byte(s, 1)
  if kind == 99 then -- 'c'
    if string.byte(s, 2) ~= 32 or string.byte(s, 67) ~= 32 or string.byte(s, 100) ~= 32 then
      return {}
    end
    local sec, usec, lease, retention = string.match(s, '^(%d+) (%d+) (%d+) (%d+)$', 101)
    if not sec then
      return {}
    end
    local now = tonumber(sec) * 1000 + floor(tonumber(usec) / 1000)
    local lease_until = now + tonumber(lease)
    retention = tonumber(retention)
    -- Whole numbers, as the digits say; the largest two must stay below 2^53.
    if now * 1000 >= 9007199254740992 or lease_until + retention >= 9007199254740992 then
      return {}
    end
    -- Every field named, so that the table has room for those a write adds.
    return {
      state = 'in_flight',
      token = now * 1000,
      lease_until = lease_until,
      retention = retention,
      expires_at = lease_until + retention,
      settled_at = nil,
      fingerprint = string.sub(s, 3, 66),
      holder = string.sub(s, 68, 99),
      settled_by = nil,
      taken_over_token = nil,
      taken_over_lease_until = nil,
      response = nil,
    }
  end
  if kind ~= 102 or #s < 186 then -- 'f'
    return {}
  end
  local code, state = string.byte(s, 2), nil
  if code == 105 then
    state = 'in_flight'
  elseif code == 99 then
    state = 'completed'
  elseif code == 114 then
    state = 'released'
  else
    return {}
  end
  local token, lease_until, retention, expires_at, settled_at, taken_over_token,
    taken_over_lease_until = struct.unpack('>ddddddd', s, 131)
  if settled_at == -1 then
    settled_at = nil
  end
  if taken_over_token == -1 then
    taken_over_token = nil
  end
  if taken_over_lease_until == -1 then
    taken_over_lease_until = nil
  end
  if not wholes(token, lease_until, retention, expires_at, settled_at, taken_over_token,
      taken_over_lease_until) then
    return {}
  end
  local holder, settled_by = string.sub(s, 67, 98), string.sub(s, 99, 130)
  if holder == NO_NONCE then
    holder = nil
  end
  if settled_by == NO_NONCE then
    settled_by = nil
  end
  local response
  if state == 'completed' then
    response = string.sub(s, 187)
  end
  return {
    state = state,
    token = token,
    lease_until = lease_until,
    retention = retention,
    expires_at = expires_at,
    settled_at = settled_at,
    fingerprint = string.sub(s, 3, 66),
    holder = holder,
    settled_by = settled_by,
    taken_over_token = taken_over_token,
    taken_over_lease_until = taken_over_lease_until,
    response = response,
  }
end

-- A hash of an earlier version.
local function from_hash(key)
  local f = redis.pcall('HMGET', key, 'state', 'token', 'lease_until', 'retention',
    'expires_at', 'settled_at', 'fingerprint', 'holder', 'settled_by', 'taken_over_token',
    'taken_over_lease_until', 'response')
  if f.err then
    return {}
  end
  -- The full form has room for exactly these lengths; other values do not decode.
  if (f[7] and #f[7] ~= 64) or (f[8] and #f[8] ~= 32) or (f[9] and #f[9] ~= 32) then
    return {}
  end
  -- A number that does not parse reads as absent, as the scripts always read these.
  local token, lease_until, retention, expires_at, settled_at, taken_over_token,
    taken_over_lease_until = tonumber(f[2]), tonumber(f[3]), tonumber(f[4]),
      tonumber(f[5]), tonumber(f[6]), tonumber(f[10]), tonumber(f[11])
  if not wholes(token, lease_until, retention, expires_at, settled_at, taken_over_token,
      taken_over_lease_until) then
    return {}
  end
  return {
    state = f[1] or nil,
    token = token,
    lease_until = lease_until,
    retention = retention,
    expires_at = expires_at,
    settled_at = settled_at,
    fingerprint = f[7] or nil,
    holder = f[8] or nil,
    settled_by = f[9] or nil,
    taken_over_token = taken_over_token,
    taken_over_lease_until = taken_over_lease_until,
    response = f[12] or nil,
  }
end

-- The record at key: a table of its fields (nil where there is none), or nil when there is
-- no record. A value that is not a record reads as a record without fields, which the
-- scripts report as corrupt.
local function load(key)
  local s = redis.pcall('GET', key)
  if type(s) == 'string' then
    return from_string(s)
  end
  if not s then
    return nil
  end
  return from_hash(key)
end

-- Writes the record, replacing whatever the key held, with the key's expiry at expires_at.
local function store(key, r)
  local code = 'i'
  if r.state == 'completed' then
    code = 'c'
  elseif r.state == 'released' then
    code = 'r'
  end
  redis.call('SET', key,
    'f' .. code .. r.fingerprint .. (r.holder or NO_NONCE) .. (r.settled_by or NO_NONCE)
      .. struct.pack('>ddddddd', r.token, r.lease_until, r.retention, r.expires_at,
        r.settled_at or -1, r.taken_over_token or -1, r.taken_over_lease_until or -1)
      .. (r.response or ''),
    'PXAT', format('%d', r.expires_at))
end
