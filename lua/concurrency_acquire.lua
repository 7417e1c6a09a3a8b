--[[
concurrency_acquire: take one in-flight slot for a request from every concurrency limit it
matches, all or none.

A limit's slots for one client (or ip, header, global) are a sorted set: each member is the
owner token of a request holding a slot, its score the time its lease ends (store clock, ms).
A holder renews its lease while its request runs (concurrency_renew.lua) and gives the slot
back when it ends (concurrency_release.lua); a holder that died stops renewing, and its slot
is free again once its lease has ended: every acquire first drops the members whose lease
ended. Time is the store's clock (TIME), never the caller's.

Shadow limits are decided exactly as enforced ones but refuse nothing: the request is allowed
when every enforced limit has a free slot; it would be allowed under enforcement when every
limit has one. An enforced limit's slot is taken when the request is allowed, a shadow limit's
only when it would be allowed, so a shadow limit counts what enforcing it would.

KEYS[i]    the slot set of limit i (members: owner tokens; scores: lease end, ms)
ARGV[1]    owner token of this request
ARGV[2]    clock offset, ms, added to TIME: always 0 in production, tests move time with it
ARGV[2i+1] limit i: slots (requests in flight at most)
ARGV[2i+2] limit i: lease, ms: how long a slot outlives a holder that stopped renewing
ARGV[2n+3] optional: a mask of n characters, '1' for a shadow limit ('0' or absent: enforced)

Returns    {allowed, now (ms, store clock), then for each limit i:
            in_flight (holders after this call), free (1 when it had a slot for this request)}
           allowed: 1 allowed and every shadow limit would allow, 2 allowed but a shadow limit
           would refuse, 0 refused: nothing written (expired holders are still dropped).
           A resend by the same owner finds its own slot and counts it as free (no second slot).

TTL        each set written expires 1 ms after the last lease in it ends.
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local owner = ARGV[1]
local n = #KEYS
local mask = ARGV[2 * n + 3] or ''

local count, free = {}, {}
local allowed, would = 1, 1
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local c = redis.call('ZCARD', KEYS[i])
  local ok = 0
  if redis.call('ZSCORE', KEYS[i], owner) or c < tonumber(ARGV[2 * i + 1]) then ok = 1 end
  count[i], free[i] = c, ok
  if ok == 0 then
    would = 0
    if string.sub(mask, i, i) ~= '1' then allowed = 0 end
  end
end

local out = {0, now}
if allowed == 1 then out[1] = (would == 1) and 1 or 2 end
for i = 1, n do
  local shadow = string.sub(mask, i, i) == '1'
  if (allowed == 1 and not shadow) or (would == 1 and shadow) then
    local lease = tonumber(ARGV[2 * i + 2])
    redis.call('ZADD', KEYS[i], now + lease, owner)
    local last = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
    redis.call('PEXPIRE', KEYS[i], tonumber(last[2]) - now + 1)
    count[i] = redis.call('ZCARD', KEYS[i])
  end
  out[#out + 1] = count[i]
  out[#out + 1] = free[i]
end
return out
