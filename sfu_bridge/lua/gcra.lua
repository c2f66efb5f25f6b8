-- AuraLink hint limiter: GCRA over many streams in one atomic call.  Version 2.
-- (Bump SCRIPT_VERSION in sfu_bridge/limiter.py, which is also part of the key prefix.)
--
-- KEYS[i]  per-stream state: the stream's TAT (theoretical arrival time) in microseconds
--          of Redis server time; absent = no debt (the key expires when TAT passes).
--          All keys share one hash tag, so the call is legal on Redis Cluster.
-- ARGV[1]  emission interval T in microseconds (1e6 / rate), an integer
-- ARGV[2]  burst tolerance in microseconds (burst * T), an integer
-- ARGV[3]  hints offered per stream this tick: #KEYS unsigned 16-bit big-endian integers
--          (one binary argument instead of #KEYS arguments keeps client packing cheap)
-- ARGV[4]  optional: "now" in microseconds of the caller's clock, and
-- ARGV[5]  the key expiry in milliseconds per microsecond of that clock. Only a load test
--          passes them (its simulated clock, so the limit holds per simulated second however
--          late its ticks run); bridges never do: their time is the server's.
-- returns  a string of #KEYS unsigned 16-bit big-endian integers: how many of each
--          stream's hints pass (the first ones offered)
--
-- Per key: tat = max(stored, now); room = floor((tolerance - (tat - now)) / T);
-- allowed = clamp(offered, 0, room); tat += allowed * T. Granting `allowed` hints at
-- once equals granting them one by one at the same instant, so batching a tick does not
-- change any decision.
local now, px_per_us
if ARGV[4] then
  now, px_per_us = tonumber(ARGV[4]), tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now, px_per_us = tonumber(t[1]) * 1000000 + tonumber(t[2]), 0.001
end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local counts = ARGV[3]
local n = #KEYS
if string.len(counts) ~= 2 * n then
  return redis.error_reply('gcra: counts must be 2 bytes per key')
end
local byte, char, floor, ceil, fmt = string.byte, string.char, math.floor, math.ceil, string.format
local call = redis.call
local out = {}
-- MGET in slices: Lua's unpack() is bounded by the C stack (a few thousand values).
local slice = 4000
local first = 1
while first <= n do
  local last = math.min(first + slice - 1, n)
  local stored = call('MGET', unpack(KEYS, first, last))
  for i = first, last do
    local hi, lo = byte(counts, 2 * i - 1, 2 * i)
    local allowed = hi * 256 + lo
    local tat = tonumber(stored[i - first + 1]) or now
    if tat < now then tat = now end
    local room = floor((tolerance - (tat - now)) / interval)
    if allowed > room then allowed = room end
    if allowed < 0 then allowed = 0 end
    if allowed > 0 then
      tat = tat + allowed * interval
      -- '%d' keeps all 16 digits (tostring would round to 14 significant digits).
      call('SET', KEYS[i], fmt('%d', tat), 'PX', math.max(1, ceil((tat - now) * px_per_us)))
    end
    out[i] = char(floor(allowed / 256), allowed % 256)
  end
  first = last + 1
end
return table.concat(out)
