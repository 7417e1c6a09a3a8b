--[[
idempotency_claim: claim an Idempotency-Key record, or say why not, in one round trip.

One hash per (client identity, key). Its state `st` is `p` (in flight: a live claim), `d`
(done: the stored response), `u` (outcome unknown: a claim whose holder stopped renewing,
with on_lost_claim = "unknown") or `x` (a withdrawn claim that had not arrived: see
idempotency_release.lua; free for everyone but that owner). Time is the store's clock (TIME),
never the caller's.

KEYS[1]    the record hash, fields:
             st  state: p | d | u | x
             o   owner token of the attempt that holds (or completed, or withdrew) it
             fp  request fingerprint (method, path, query, SHA-256 of the body)
             lx  lease end, ms since the epoch, store clock (state p only)
             s   status; h  storable headers (encoded by the caller); b  body (state d only)
ARGV[1]    fingerprint of this request
ARGV[2]    owner token of this attempt (random, never reused)
ARGV[3]    lock_ttl, ms: how long a claim outlives a holder that stops renewing it
ARGV[4]    linger, ms: how long a lost claim is remembered after its lease ends
             (ttl with on_lost_claim = "unknown", 0 with "retry")
ARGV[5]    on_lost_claim: "unknown" (at most once) | "retry" (at least once)

Returns    {"new"}                        claimed by ARGV[2]; also when ARGV[2] already holds
                                          it (a resent claim is the same claim)
           {"mismatch"}                   the key was used with another fingerprint (any state)
           {"in_flight", lease_left_ms}   another attempt holds a live claim
           {"done", status, headers, body} completed: the response to replay
           {"unknown"}                    the outcome is unknown: a lost claim ("unknown" mode)
           {"withdrawn"}                  ARGV[2] withdrew this claim before it arrived: nothing
                                          is written (its caller has long given up on the reply)
           A lost claim (lease ended, state p) is settled here, by the first claim to see it:
           "unknown" turns it into state u, which keeps its owner: the holder's late
           completion still replaces it (idempotency_complete); "retry" hands it to ARGV[2]
           ({"new"}), and the old holder can no longer complete it.

TTL        a claim: lock_ttl + linger (renewed by idempotency_renew; lasts past the lease so a
           lost claim can be recognised); a record turned `u`: what is left of linger after its
           lease end. Completed records are written by idempotency_complete.
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lock_ms = tonumber(ARGV[3])
local linger_ms = tonumber(ARGV[4])

local rec = redis.call('HMGET', KEYS[1], 'st', 'o', 'fp', 'lx', 's', 'h', 'b')
local st = rec[1]

local function claim()
  redis.call('HSET', KEYS[1], 'st', 'p', 'o', ARGV[2], 'fp', ARGV[1], 'lx', now + lock_ms)
  redis.call('PEXPIRE', KEYS[1], lock_ms + linger_ms)
  return {'new'}
end

if not st then
  return claim()
end
if st == 'x' then
  if rec[2] == ARGV[2] then
    return {'withdrawn'}
  end
  return claim()
end
if rec[3] ~= ARGV[1] then
  return {'mismatch'}
end
if st == 'p' then
  if rec[2] == ARGV[2] then
    return {'new'}
  end
  local left = tonumber(rec[4]) - now
  if left > 0 then
    return {'in_flight', left}
  end
  if ARGV[5] == 'retry' then
    return claim()
  end
  redis.call('HSET', KEYS[1], 'st', 'u')
  redis.call('HDEL', KEYS[1], 'lx')
  -- remembered `linger` after the lease ended, as it would have been unsettled
  redis.call('PEXPIRE', KEYS[1], math.max(1, linger_ms + left))
  return {'unknown'}
end
if st == 'u' then
  return {'unknown'}
end
return {'done', tonumber(rec[5]), rec[6], rec[7]}
