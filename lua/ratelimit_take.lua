--[[
ratelimit_take: charge one request to every token bucket it matches, all or none.

A bucket is enforced (the default) or shadow (a policy with mode = "shadow", being dark-launched):
the request is allowed iff every enforced bucket has its cost; it would be allowed under
enforcement iff every bucket, shadow ones included, has its cost. Enforced buckets are charged
iff it is allowed, shadow buckets iff it would be allowed, so a shadow bucket is charged exactly
when enforcing it too would have let the request through, and a shadow denial charges nothing,
like an enforced one. Nothing is written when the request is not allowed.

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
ARGV[4n+2] optional, n = #KEYS: the shadow mask, n characters '0' (enforced) or '1' (shadow),
           one per policy in KEYS order; absent: every bucket is enforced

Returns    {decision, now (ms, store clock), then for each policy i:
            remaining (whole tokens left, after its charge when it was charged),
            full_ms (ms until the bucket is full again),
            wait_ms (ms until `cost` tokens are there; 0 when they are there now)}
           decision: 1 allowed, and every shadow bucket had its cost too (all charged);
                     2 allowed, but at least one shadow bucket lacked its cost (the enforced
                       buckets charged, no shadow bucket);
                     0 denied: some enforced bucket lacked its cost; nothing written.
           So a bucket was charged iff decision == 1, or decision == 2 and it is enforced; an
           uncharged bucket lacked its cost iff its wait_ms > 0 (a charged one's wait_ms is
           about the next request). Without a mask the decision is 1 or 0, as it always was.

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
local mask = ARGV[4 * n + 2]
local level, at, shadow = {}, {}, {}
local allowed, would = 1, 1

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
  shadow[i] = mask ~= nil and string.sub(mask, i, i) == '1'
  if lv < tonumber(ARGV[4 * i + 1]) * unit then
    would = 0
    if not shadow[i] then allowed = 0 end
  end
end

local decision = 0
if allowed == 1 then
  if would == 1 then decision = 1 else decision = 2 end
end
local out = {decision, now}
for i = 1, n do
  local unit = tonumber(ARGV[4 * i - 2])
  local refill = tonumber(ARGV[4 * i - 1])
  local cap = tonumber(ARGV[4 * i]) * unit
  local need = tonumber(ARGV[4 * i + 1]) * unit
  local lv = level[i]
  local lag = at[i] - now
  local charged = would == 1 or (allowed == 1 and not shadow[i])
  if charged then
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
