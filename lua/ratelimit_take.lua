--[[
ratelimit_take: charge one request to every token bucket it matches, all or none.

A bucket holds `level` units; one token is `unit` units and the bucket refills `refill` units
per millisecond up to `burst * unit`. The caller reduces limit/period to refill/unit by their
gcd, so every number here is an integer below 2^53: exact over any run, no float drift.
A bucket that does not exist is full. Time is the store's clock (TIME), never the caller's.

KEYS[i]    the bucket hash of policy i, fields:
             l  level, units
             t  time of the last write, ms since the epoch, store clock
             u  the unit `l` was written with (a changed policy keeps its whole tokens)
ARGV[1]    clock offset, ms, added to TIME: always 0 in production, tests move time with it
ARGV[4i-2] policy i: unit, units per token
ARGV[4i-1] policy i: refill, units per ms
ARGV[4i]   policy i: burst, tokens (the bucket size)
ARGV[4i+1] policy i: cost, tokens this request takes

Returns    {allowed (1 or 0), now (ms, store clock), then for each policy i:
            remaining (whole tokens left, after the charge when allowed),
            full_ms (ms until the bucket is full again),
            wait_ms (ms until `cost` tokens are there; 0 when they are there now)}
           A denial writes nothing: no bucket is charged when any one denies.

TTL        each bucket written expires 1 ms after it would be full again (full_ms + 1), when
           its absence means exactly what its content did.
]]

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[1])

-- floor(a / b) for integers 0 <= a, 0 < b below 2^53: the float quotient can be one off.
local function floor_div(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

local function ceil_div(a, b)
  local q = floor_div(a, b)
  if q * b < a then q = q + 1 end
  return q
end

local n = #KEYS
local level, at = {}, {}
local allowed = 1

for i = 1, n do
  local unit = tonumber(ARGV[4 * i - 2])
  local refill = tonumber(ARGV[4 * i - 1])
  local cap = tonumber(ARGV[4 * i]) * unit
  local b = redis.call('HMGET', KEYS[i], 'l', 't', 'u')
  local lv, ts = cap, now
  if b[1] then
    lv, ts = tonumber(b[1]), tonumber(b[2])
    local u = tonumber(b[3])
    if u ~= unit then
      local tokens = floor_div(lv, u)
      if tokens * unit >= cap then lv = cap else lv = tokens * unit end
    end
    local elapsed = now - ts
    if elapsed > 0 and lv < cap then
      -- elapsed * refill may only be formed while it stays below cap - lv + refill
      if elapsed >= ceil_div(cap - lv, refill) then lv = cap else lv = lv + elapsed * refill end
    end
    if lv > cap then lv = cap end
    -- a store clock that stepped back (failover) must not refill the same time twice
    if ts < now then ts = now end
  end
  level[i], at[i] = lv, ts
  if lv < tonumber(ARGV[4 * i + 1]) * unit then allowed = 0 end
end

local out = {allowed, now}
for i = 1, n do
  local unit = tonumber(ARGV[4 * i - 2])
  local refill = tonumber(ARGV[4 * i - 1])
  local cap = tonumber(ARGV[4 * i]) * unit
  local need = tonumber(ARGV[4 * i + 1]) * unit
  local lv = level[i]
  local lag = at[i] - now
  if allowed == 1 then
    lv = lv - need
    local full_ms = ceil_div(cap - lv, refill) + lag
    redis.call('HSET', KEYS[i], 'l', lv, 't', at[i], 'u', unit)
    redis.call('PEXPIRE', KEYS[i], full_ms + 1)
  end
  local wait_ms = 0
  if lv < need then wait_ms = ceil_div(need - lv, refill) + lag end
  out[#out + 1] = floor_div(lv, unit)
  out[#out + 1] = ceil_div(cap - lv, refill) + lag
  out[#out + 1] = wait_ms
end
return out
