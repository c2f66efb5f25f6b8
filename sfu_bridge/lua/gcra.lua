-- AuraLink hint limiter: GCRA over many streams in one atomic call.  Version 3.
-- (Bump SCRIPT_VERSION in sfu_bridge/limiter.py, which is also part of the key names.)
--
-- KEYS[1]  the bridge's state: a hash, field = stream id, value = that stream's TAT
--          (theoretical arrival time) in microseconds of Redis server time; absent = no
--          debt. The hash expires when its latest TAT passes.
-- KEYS[2]  where the prune below keeps its HSCAN cursor (same hash tag: the call stays
--          legal on Redis Cluster).
-- ARGV[1]  emission interval T in microseconds (1e6 / rate), an integer
-- ARGV[2]  burst tolerance in microseconds (burst * T), an integer
-- ARGV[3]  hints offered per stream this call: one unsigned 16-bit big-endian integer per
--          stream id below (one binary argument keeps client packing cheap)
-- ARGV[4]  "now" in microseconds of the caller's clock, and
-- ARGV[5]  the expiry in milliseconds per microsecond of that clock; both empty for the
--          server's clock (TIME). Only a load test passes them (its simulated clock, so the
--          limit holds per simulated second however late its ticks run); bridges never do.
-- ARGV[6]  prune only while the hash holds more fields than this (see below)
-- ARGV[7..] the stream ids (distinct)
-- returns  a string of one unsigned 16-bit big-endian integer per stream: how many of its
--          hints pass (the first ones offered)
--
-- Per stream: tat = max(stored, now); room = floor((tolerance - (tat - now)) / T);
-- allowed = clamp(offered, 0, room); tat += allowed * T. Granting `allowed` hints at
-- once equals granting them one by one at the same instant, so batching a call does not
-- change any decision. After a call every TAT is at most now + tolerance, so the hash
-- (refreshed whenever a TAT is written) expires when the last debt is paid.
-- A field whose TAT has passed decides exactly as an absent one, so once the hash holds more
-- than ARGV[6] fields each call also scans a few (HSCAN, COUNT 32) and deletes those: streams
-- that left stop costing memory, without their bridge having to say so. Not below that
-- size: a small hash is a listpack, read by a linear scan, and pruning one that stays small
-- costs more per call than the memory it frees.
local now, px_per_us
if ARGV[4] ~= '' then
  now, px_per_us = tonumber(ARGV[4]), tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now, px_per_us = tonumber(t[1]) * 1000000 + tonumber(t[2]), 0.001
end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local counts = ARGV[3]
local n = #ARGV - 6
if string.len(counts) ~= 2 * n then
  return redis.error_reply('gcra: counts must be 2 bytes per stream')
end
local byte, char, floor, ceil, fmt, min = string.byte, string.char, math.floor, math.ceil, string.format, math.min
local call, key = redis.call, KEYS[1]
local out, set = {}, {}
-- HMGET/HSET in slices: Lua's unpack() is bounded by the C stack (a few thousand values).
local slice = 4000
for first = 1, n, slice do
  local last = min(first + slice - 1, n)
  local stored = call('HMGET', key, unpack(ARGV, first + 6, last + 6))
  for i = first, last do
    local hi, lo = byte(counts, 2 * i - 1, 2 * i)
    local allowed = hi * 256 + lo
    local tat = tonumber(stored[i - first + 1]) or now
    if tat < now then tat = now end
    local room = floor((tolerance - (tat - now)) / interval)
    if allowed > room then allowed = room end
    if allowed < 0 then allowed = 0 end
    if allowed > 0 then
      -- '%d' keeps all 16 digits (tostring would round to 14 significant digits).
      set[#set + 1] = ARGV[i + 6]
      set[#set + 1] = fmt('%d', tat + allowed * interval)
    end
    out[i] = char(floor(allowed / 256), allowed % 256)
  end
end
local ttl = math.max(1, ceil(tolerance * px_per_us))
for first = 1, #set, slice do  -- slice is even: a field and its value stay together
  call('HSET', key, unpack(set, first, min(first + slice - 1, #set)))
end
if #set > 0 then
  call('PEXPIRE', key, ttl)
end
-- the prune: fields whose debt is paid
if call('HLEN', key) <= tonumber(ARGV[6]) then
  return table.concat(out)
end
local scan = call('HSCAN', key, call('GET', KEYS[2]) or '0', 'COUNT', 32)
local fields, paid = scan[2], {}
for j = 1, #fields, 2 do
  if (tonumber(fields[j + 1]) or 0) <= now then paid[#paid + 1] = fields[j] end
end
if #paid > 0 then
  call('HDEL', key, unpack(paid))
end
if scan[1] == '0' then
  call('DEL', KEYS[2])
else
  call('SET', KEYS[2], scan[1], 'PX', ttl)
end
return table.concat(out)
