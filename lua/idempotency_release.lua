--[[
idempotency_release: free a claimed key, for its owner only, when the request certainly never
reached the upstream (so a retry may run it).

It also withdraws a claim that has not arrived yet: a claim call that timed out may still be on
its way (a paused or blocked Redis runs what it already received when it resumes, after
commands on other connections). When there is no record, a withdrawal marker (state `x`, the
owner) is left, and idempotency_claim then refuses that owner's late claim; any other attempt
claims the key as if it were free.

KEYS[1]    the record hash (fields: see idempotency_claim.lua)
ARGV[1]    owner token of the attempt that claimed it
ARGV[2]    ms to keep a withdrawal marker (the records' ttl)
ARGV[3]    "1": on a release, tell the duplicates waiting for this record (PUBLISH on the
           channel named like the record's key); absent or "0": nothing published

Returns    1 released (the record is deleted); 0 refused: not this owner's live claim
           (completed, settled as lost, another's, or not there: then the marker is written)

TTL        the marker: ARGV[2]. Nothing else written: a released record is deleted.
]]

local rec = redis.call('HMGET', KEYS[1], 'st', 'o')
if rec[1] == 'p' and rec[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[3] == '1' then
    redis.call('PUBLISH', KEYS[1], 'r')
  end
  return 1
end
if not rec[1] then
  redis.call('HSET', KEYS[1], 'st', 'x', 'o', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
