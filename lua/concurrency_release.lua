--[[
concurrency_release: give back the slots one request holds (its response ended, its client
went away, its app raised, or it was cancelled), so another request can take them at once.

KEYS[i]    the slot set of limit i, as concurrency_acquire.lua writes it
ARGV[1]    owner token of the request that holds the slots

Returns    the number of slots given back; a slot that is not held any more (its lease ended and
           an acquire dropped it, or a resend of this call gave it back already) is left alone.

TTL        untouched: it covers the last lease still in the set (an empty set is deleted).
]]

local released = 0
for i = 1, #KEYS do
  released = released + redis.call('ZREM', KEYS[i], ARGV[1])
end
return released
