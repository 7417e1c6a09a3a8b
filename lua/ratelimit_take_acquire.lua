--[[
ratelimit_take_acquire: admit a request in one round trip: charge its rate-limit buckets, all
or none, and only when they are charged, take a slot of every concurrency limit it matches;
when an enforced concurrency limit refuses, the buckets get their tokens back, so a refused
request charges nothing and holds nothing.

The decisions are ratelimit_take.lua, concurrency_acquire.lua and ratelimit_refund.lua
themselves, included below as functions (gateway/store/scripts.py composes the source). It runs
where the buckets and the slot sets share a node: one Redis, Sentinel, memory://, or a cluster
slot. Shadow buckets and shadow limits follow their own script's rule (each counts what
enforcing it would); only an enforced refusal undoes the other half.

KEYS[1..n]      the buckets of the request's policies (ratelimit_take's KEYS)
KEYS[n+1..n+m]  the slot sets of its concurrency limits (concurrency_acquire's KEYS)
ARGV[1]         n, the number of buckets
ARGV[2]         clock offset, ms (both scripts')
ARGV[3..4n+2]   per bucket: unit, refill, burst, cost (ratelimit_take's ARGV[2..])
ARGV[4n+3]      the buckets' shadow mask ('' when every bucket is enforced)
ARGV[4n+4]      owner token of this request (concurrency_acquire's ARGV[1])
ARGV[4n+5..4n+4+2m]  per limit: slots, lease (concurrency_acquire's ARGV[3..])
ARGV[4n+5+2m]   the limits' shadow mask ('' when every limit is enforced)

Returns    {take}          the rate limit denied (take[1] == 0): nothing written, no slot taken
           {take, slots}   slots is concurrency_acquire's reply; when it refused (slots[1] == 0)
                           the tokens the take charged are back, and no slot is held
           take is ratelimit_take's reply.

TTL        the buckets as ratelimit_take sets them, the slot sets as concurrency_acquire does.
]]

--#include ratelimit_take as take
--#include concurrency_acquire as acquire
--#include ratelimit_refund as refund

local n = tonumber(ARGV[1])
local m = #KEYS - n
local bucket_mask = ARGV[4 * n + 3]
local first_limit = 4 * n + 5
local limit_mask = ARGV[first_limit + 2 * m]

local bucket_keys, take_argv = {}, {ARGV[2]}
for i = 1, n do bucket_keys[i] = KEYS[i] end
for i = 3, 4 * n + 2 do take_argv[#take_argv + 1] = ARGV[i] end
if bucket_mask ~= '' then take_argv[#take_argv + 1] = bucket_mask end
local decision = take(bucket_keys, take_argv)
if decision[1] == 0 then
  return {decision}
end

local set_keys, acquire_argv = {}, {ARGV[4 * n + 4], ARGV[2]}
for i = 1, m do set_keys[i] = KEYS[n + i] end
for i = first_limit, first_limit + 2 * m - 1 do acquire_argv[#acquire_argv + 1] = ARGV[i] end
if limit_mask ~= '' then acquire_argv[#acquire_argv + 1] = limit_mask end
local slots = acquire(set_keys, acquire_argv)

if slots[1] == 0 then
  -- refused: give back what the take charged (its enforced buckets, and its shadow buckets
  -- when it would have allowed: reply 1)
  local keys, args = {}, {}
  for i = 1, n do
    local shadow = string.sub(bucket_mask, i, i) == '1'
    if not shadow or decision[1] == 1 then
      keys[#keys + 1] = KEYS[i]
      for j = 4 * i - 1, 4 * i + 2 do args[#args + 1] = ARGV[j] end
    end
  end
  if #keys > 0 then refund(keys, args) end
end
return {decision, slots}
