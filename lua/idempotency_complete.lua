--[[
idempotency_complete: store the response of a claimed request, for its holder only (fencing).

The holder's outcome is the truth, however late it arrives: it is accepted while the claim is
still the holder's (`p`, also past its lease: nobody else has run it) and when the holder's
lapsed claim was settled as outcome unknown (`u`, same owner, on_lost_claim = "unknown"): the
real response replaces the 502 for every later retry. It never overwrites a record another
attempt owns (a lapsed claim handed to a retry with on_lost_claim = "retry", or a key claimed
afresh after its record was gone).

KEYS[1]    the record hash (fields: see idempotency_claim.lua)
ARGV[1]    owner token of the attempt that claimed it
ARGV[2]    status code
ARGV[3]    storable headers, encoded by the caller
ARGV[4]    body
ARGV[5]    ttl, ms: how long the completed record is replayed
ARGV[6]    "1": tell the duplicates waiting for this record (idempotency.on_in_flight = "wait"):
           PUBLISH on the channel named like the record's key; absent or "0": nothing published

Returns    1 stored (or already stored by this owner: a resent completion is the same one)
           0 refused: the record is not this owner's (another's claim or record, withdrawn,
             or gone); nothing is written

TTL        the completed record: ttl, from now.
]]

local rec = redis.call('HMGET', KEYS[1], 'st', 'o')
if rec[2] ~= ARGV[1] then
  return 0
end
if rec[1] == 'd' then
  return 1
end
if rec[1] ~= 'p' and rec[1] ~= 'u' then
  return 0
end
redis.call('HSET', KEYS[1], 'st', 'd', 's', ARGV[2], 'h', ARGV[3], 'b', ARGV[4])
redis.call('HDEL', KEYS[1], 'lx', 'rl')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[6] == '1' then
  redis.call('PUBLISH', KEYS[1], 'd')
end
return 1
