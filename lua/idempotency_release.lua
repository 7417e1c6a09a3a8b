--[[
idempotency_release: free a claimed key, for its owner only, when the request certainly never
reached the upstream (so a retry may run it).

KEYS[1]    the record hash (fields: see idempotency_claim.lua)
ARGV[1]    owner token of the attempt that claimed it

Returns    1 released (the record is deleted); 0 refused: not this owner's live claim
           (completed, settled as lost, or already gone), nothing is written

TTL        none written: the record is deleted.
]]

local rec = redis.call('HMGET', KEYS[1], 'st', 'o')
if rec[1] ~= 'p' or rec[2] ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
