--[[
concurrency_renew: extend the leases of the slots one request holds while it still runs, so a
long request keeps its slots, and a holder that died loses them one lease after its last renewal.

KEYS[i]    the slot set of limit i, as concurrency_acquire.lua writes it
ARGV[1]    owner token of the request that holds the slots
ARGV[2]    clock offset, ms (as in concurrency_acquire.lua)
ARGV[i+2]  limit i: lease, ms, from now (store clock)

Returns    the number of slots renewed; a slot the owner does not hold any more (its lease ended
           and an acquire dropped it) is not taken again: it was given to another request.

TTL        each set renewed expires 1 ms after the last lease in it ends.
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local renewed = 0
for i = 1, #KEYS do
  local lease_end = now + tonumber(ARGV[i + 2])
  if redis.call('ZSCORE', KEYS[i], ARGV[1]) then
    redis.call('ZADD', KEYS[i], lease_end, ARGV[1])
    renewed = renewed + 1
    local last = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
    redis.call('PEXPIRE', KEYS[i], tonumber(last[2]) - now + 1)
  end
end
return renewed
