--[[
ratelimit_refund: give back the tokens one request took from these buckets, because a bucket in
another cluster slot denied that request (all matching policies are charged, or none), or, for
shadow buckets, because a shadow bucket in another slot lacked its cost (a shadow bucket is
charged only when every bucket of the request had its cost: see ratelimit_take).

Only a Redis Cluster needs it: on one Redis all of a request's buckets are decided by one
ratelimit_take. Each bucket gets `cost` tokens back, at most up to `burst`; the write time `t` is
kept, so refill goes on from where the take left it, exactly as if the take had not happened.

KEYS[i]    the bucket hash of policy i (all in one slot), as written by ratelimit_take
ARGV[4i-3] policy i: unit, units per token
ARGV[4i-2] policy i: refill, units per ms (unused here; the same layout as ratelimit_take)
ARGV[4i-1] policy i: burst, tokens (the bucket size)
ARGV[4i]   policy i: cost, tokens to give back

Returns    the number of buckets refunded. A bucket that is gone (it expired: it is full) or
           was rewritten with another unit (the policy changed meanwhile) is left alone.

TTL        untouched. The take set it for the lower level; with the tokens back the bucket is
           full sooner, and a key that outlives that moment still reads as full.
]]

local refunded = 0
for i = 1, #KEYS do
  local unit = tonumber(ARGV[4 * i - 3])
  local cap = tonumber(ARGV[4 * i - 1]) * unit
  local b = redis.call('HMGET', KEYS[i], 'l', 'u')
  if b[1] and tonumber(b[2]) == unit then
    local lv = tonumber(b[1]) + tonumber(ARGV[4 * i]) * unit
    if lv > cap then lv = cap end
    redis.call('HSET', KEYS[i], 'l', lv)
    refunded = refunded + 1
  end
end
return refunded
