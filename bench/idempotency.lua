-- wrk script for the gateway benchmark (bench/gateway): POSTs a small JSON charge with an
-- Idempotency-Key and an Authorization header.
--
--   wrk -t1 -c64 -d10s -s bench/idempotency.lua URL -- MODE RUN [PATH] [KEYS]
--
-- MODE  fresh   every request a key never used before
--       replay  each thread cycles over KEYS keys of its own (default 1000): run it once to
--               prime them (a warm-up), then again with the same RUN: every request repeats
--               an already-completed key
--       mix     80 % fresh keys, 20 % retries of a key this thread sent 128 to 1,127
--               requests earlier (completed by then: wrk keeps one request per connection
--               in flight)
-- RUN   a prefix that keeps the keys of different runs apart
-- PATH  the request path (default /v1/charges)
--
-- A key's body is a function of the key, so a retry has the same fingerprint. Keys are
-- unique per thread (RUN, thread number, counter). At the end, one line:
--   RESULT requests=N duration_us=N errors=N non2xx=N rps=N p50_us=N p99_us=N p999_us=N

local threads = {}
local counter = 1

function setup(thread)
  thread:set("thread_id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local mode, run, path, keys
local id, n, fresh = 0, 0, 0

function init(args)
  mode = args[1] or "fresh"
  run = args[2] or "run"
  path = args[3] or "/v1/charges"
  keys = tonumber(args[4] or "1000")
  id = thread_id or 0
  if mode ~= "fresh" and mode ~= "replay" and mode ~= "mix" then
    error("mode must be fresh, replay or mix, not " .. mode)
  end
end

local function key_of(i)
  return run .. "-" .. id .. "-" .. i
end

local function post(key)
  local body = '{"amount":100,"currency":"eur","order":"' .. key .. '"}'
  return wrk.format("POST", path, {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer bench-token",
    ["Idempotency-Key"] = key,
  }, body)
end

function request()
  n = n + 1
  if mode == "replay" then
    return post(key_of(n % keys))
  end
  if mode == "mix" and n % 5 == 0 and fresh >= 1128 then
    -- A retry: a key sent between 128 and 1127 fresh keys ago.
    return post(key_of(fresh - 128 - math.random(0, 999)))
  end
  fresh = fresh + 1
  return post(key_of(fresh))
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d errors=%d non2xx=%d rps=%.1f p50_us=%d p99_us=%d p999_us=%d\n",
    summary.requests, summary.duration,
    errors.connect + errors.read + errors.write + errors.timeout, errors.status,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
