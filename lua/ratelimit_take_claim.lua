--[[
ratelimit_take_claim: admit a keyed request in one round trip: charge its rate-limit buckets,
all or none, and only when the take allows the request, claim its Idempotency-Key record.

The two decisions are ratelimit_take.lua and idempotency_claim.lua themselves, included below
as functions (gateway/store/scripts.py composes the source), so each keeps one definition.
It runs where the buckets and the record share a node: one Redis, Sentinel, memory://, or a
cluster slot. A denial claims nothing; a call resent after it ran (its reply was lost) finds
its own claim and answers what it answered the first time, charging nothing again.

KEYS[1..n] the buckets of the request's policies (ratelimit_take's KEYS)
KEYS[n+1]  the record hash (idempotency_claim's KEYS[1]; field rl: this script's take reply,
           kept while the claim is in flight so a resend answers the same)
ARGV[1]    n, the number of buckets
ARGV[2]    clock offset, ms (ratelimit_take's ARGV[1])
ARGV[3..4n+2]  per bucket: unit, refill, burst, cost (ratelimit_take's ARGV[2..])
ARGV[4n+3..4n+7]  fingerprint, owner, lock_ttl, linger, on_lost_claim (idempotency_claim's ARGV)
ARGV[4n+8] optional: the shadow mask, n characters '0'/'1' (ratelimit_take's ARGV[4n+2]),
           passed on to the take; absent: every bucket is enforced

Returns    {take}          denied (take[1] == 0): nothing written, nothing claimed
           {take, claim}   allowed (take[1] == 1, or 2 when a shadow bucket lacked its cost:
                           the enforced buckets charged, the shadow ones not); claim is
                           idempotency_claim's reply
           take is ratelimit_take's reply: {decision, now, then remaining, full_ms, wait_ms per bucket}

TTL        the buckets as ratelimit_take sets them; the record as idempotency_claim sets it
           (rl lives in the record, and idempotency_complete removes it).
]]

--#include ratelimit_take as take
--#include idempotency_claim as claim

local n = tonumber(ARGV[1])
local record = KEYS[n + 1]
local owner = ARGV[4 * n + 4]

local held = redis.call('HMGET', KEYS[n + 1], 'st', 'o', 'rl')
if held[1] == 'p' and held[2] == owner and held[3] then
  -- this call ran before and its reply was lost: the same answer, no second charge
  local first = {}
  for v in string.gmatch(held[3], '[^,]+') do first[#first + 1] = tonumber(v) end
  return {first, {'new'}}
end

local bucket_keys, take_argv = {}, {ARGV[2]}
for i = 1, n do bucket_keys[i] = KEYS[i] end
for i = 3, 4 * n + 2 do take_argv[#take_argv + 1] = ARGV[i] end
if ARGV[4 * n + 8] then take_argv[#take_argv + 1] = ARGV[4 * n + 8] end
local decision = take(bucket_keys, take_argv)
if decision[1] == 0 then
  return {decision}
end

local claim_argv = {}
for i = 4 * n + 3, 4 * n + 7 do claim_argv[#claim_argv + 1] = ARGV[i] end
local claimed = claim({record}, claim_argv)
if claimed[1] == 'new' then
  redis.call('HSET', KEYS[n + 1], 'rl', table.concat(decision, ','))
end
return {decision, claimed}
