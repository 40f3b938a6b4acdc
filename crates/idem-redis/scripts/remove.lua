#!lua
-- Deletes a record whatever its state (an operator's purge), then publishes that it settled
-- so that its waiters read it again.
--
-- KEYS[1]  the record's key
-- ARGV[1]  PUBLISH or SPUBLISH
-- ARGV[2]  the channel
-- ARGV[3]  the message (the record id, hex)
--
-- Replies 1 if a live record was deleted, else 0.
local key = KEYS[1]

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + floor(tonumber(time[2]) / 1000)

local r = load(key)
local expires_at = r and r.expires_at
local live = 0
if redis.call('DEL', key) == 1 and (expires_at == nil or expires_at > now) then
  live = 1
end
redis.call(ARGV[1], ARGV[2], ARGV[3])
return live
