--[[
idempotency_renew: extend the lease of a claim whose request is still running, for its owner
only. A holder renews for as long as its request runs; one that stops (it died) can lose the
claim from lock_ttl after its last renewal: the first other claim to see it settles it. Until
then the lapsed claim is still the holder's to renew or complete, since nobody else ran it.

KEYS[1]    the record hash (fields: see idempotency_claim.lua)
ARGV[1]    owner token of the attempt that claimed it
ARGV[2]    lock_ttl, ms: the new lease, from now (store clock)
ARGV[3]    linger, ms: how long a lost claim is remembered after its lease (as in the claim)

Returns    1 renewed; 0 refused: not this owner's claim any more (completed, settled as lost
           by a retry, or gone), nothing is written

TTL        the claim: lock_ttl + linger, from now.
]]

local rec = redis.call('HMGET', KEYS[1], 'st', 'o')
if rec[1] ~= 'p' or rec[2] ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'lx', now + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]))
return 1
