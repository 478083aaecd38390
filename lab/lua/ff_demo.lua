#!lua name=ff_demo
-- The demo engine's producers for Valkey (7.2+ / Redis 7+): a function library of its own, beside
-- the subsystem's `ff_completions` (which holds the readers and the durable groups; load it
-- first: its versions up to 6 also held these functions), loaded by the lab's demo engine with
-- FUNCTION LOAD REPLACE when `ff_demo_version` answers something else. Bump VERSION together
-- with `LIBRARY_VERSION` in lab/src/engine/valkey.rs.
--
-- Every terminal transition (success, failed, cancelled, expired, skipped), in one atomic call:
--   1. writes the execution's state,
--   2. XADDs the completion to its partition's completion stream (KEYS, `MAXLEN ~ <maxlen>`
--      from ARGV),
--      fields execution_id, flow_id, outcome, namespace, tags (JSON object), occurred_at_ms
--      (server TIME), partition,
--   3. PUBLISHes {"execution_id", "flow_id", "outcome"} on `ff:dag:completions`.
-- Lease history (claim: acquired | reclaimed, heartbeat: renewed, expiry sweep: expired,
-- operator: revoked) and signal delivery (satisfied | buffered | deduped) are written the same
-- way, atomically with their state change, to the same partition stream: their entries carry
-- a `family` field (lease_history | signal_delivery; absent on a completion), the kind in
-- `outcome`, and lease_id, worker, revoked_by, signal_id, waitpoint_id, source_identity where
-- they apply. They are PUBLISHed as {"execution_id", "family"} on
-- `{ff:dag:completions}:families` only (its hash tag puts it in the slot of
-- `ff:dag:completions`, so a cluster client subscribes both on one node):
-- `ff:dag:completions` keeps carrying completions alone.
-- Every function validates all of its arguments before it writes anything; bad arguments are
-- an error reply starting `ff_demo invalid:`, a refused state change one starting
-- `ff_demo conflict:`.
--
-- Keys. Callers pass the keys a call is about in KEYS: the execution's or flow's own keys and
-- its partition's stream, eligible index and pending edges. Every key carries the `{fp:N}`
-- hash tag of its partition (a flow and all its executions share one), so in a cluster each
-- call stays in one slot. Keys of related executions (parents, children, flow members) are
-- derived here from the ids the library stores: in a cluster they must be of the same flow
-- (partition); on a single node any:
--   ff:exec:{fp:N}:<uuid>:core       hash  state attempt max_attempts pending flow ns tags
--                                          partition worker created updated lease_id
--                                          lease_state (active|expired|revoked|released)
--                                          lease_expires (ms)
--   ff:exec:{fp:N}:<uuid>:waitpoints hash  waitpoint id -> open | satisfied
--   ff:exec:{fp:N}:<uuid>:buffered   hash  waitpoint id -> signals buffered, not consumed yet
--   ff:exec:{fp:N}:<uuid>:signal_keys set  idempotency keys of deliveries that were not deduped
--   ff:exec:{fp:N}:<uuid>:children   set   ids of executions that depend on it
--   ff:exec:{fp:N}:<uuid>:deps       hash  parent id -> pending | satisfied | failed
--   ff:flow:{fp:N}:<uuid>:core       hash  ns state created
--   ff:flow:{fp:N}:<uuid>:members    set   execution ids
--   ff:eligible:{fp:N}               zset  partition N's eligible execution ids, by creation time
--   ff:lease_expiry:{fp:N}           zset  partition N's leased execution ids, by lease end (ms)
--   ff:pending_edges:{fp:N}          set   "parent|child" edges whose parent (of partition N) is
--                                          terminal but which are not resolved yet
--   ff:completions:{fp:N}            stream  partition N's completions
--   ff:completions                   stream  the single stream of versions 1 and 2, still read
--                                          (never written) until it is empty
--

local VERSION = '2'
local CHANNEL = 'ff:dag:completions'
local FAMILY_CHANNEL = '{ff:dag:completions}:families'
local TERMINAL = { success = true, failed = true, cancelled = true, expired = true, skipped = true }
local OPEN = { blocked = true, eligible = true, running = true }
local PENDING = { blocked = true, eligible = true }
local RUNNING = { running = true }
local UUID = '%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x'

-- Validation ---------------------------------------------------------------------------------

local function invalid(msg)
  return redis.error_reply('ERR ff_demo invalid: ' .. msg)
end

local function conflict(msg)
  return redis.error_reply('ERR ff_demo conflict: ' .. msg)
end

local function valid_uuid(u)
  return type(u) == 'string' and string.match(u, '^' .. UUID .. '$') ~= nil
end

-- The partition of a `{fp:N}:<uuid>` execution id, or nil when malformed.
local function partition_of(id)
  if type(id) ~= 'string' then return nil end
  local n = string.match(id, '^{fp:(%d+)}:' .. UUID .. '$')
  local p = tonumber(n)
  if p == nil or p > 255 or #n > 3 then return nil end
  return p
end

local function positive_int(n)
  local v = tonumber(n)
  if v == nil or v < 1 or v ~= math.floor(v) or v > 2 ^ 53 then return nil end
  return v
end

-- The error when `keys` does not hold exactly `n` keys, else nil.
local function wrong_keys(keys, n)
  if #keys ~= n then return invalid('expected ' .. n .. ' keys, got ' .. #keys) end
  return nil
end

-- Keys of related executions -----------------------------------------------------------------

local function exec_key(id, part) return 'ff:exec:' .. id .. ':' .. part end

-- The pending-edges set of the partition of execution `id` (a valid id).
local function pending_key(id) return 'ff:pending_edges:{fp:' .. partition_of(id) .. '}' end

-- Shared writes ------------------------------------------------------------------------------

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Makes `id` eligible again (its core key is `core`).
local function make_eligible(core, id, eligible)
  redis.call('HSET', core, 'state', 'eligible', 'updated', now_ms())
  redis.call('ZADD', eligible, tonumber(redis.call('HGET', core, 'created')) or 0, id)
end

-- Moves execution `id` (keys `core`, `children`) from one of the states in `from` to the
-- terminal `outcome`, writes its completion to `shared.stream` and publishes it. Returns false
-- (writing nothing) when its state is not in `from`.
local function finish(id, core, children, outcome, from, shared, traceparent)
  local state = redis.call('HGET', core, 'state')
  if not state or not from[state] then return false end
  local e = redis.call('HMGET', core, 'flow', 'ns', 'tags', 'partition')
  local ts = now_ms()
  redis.call('HSET', core, 'state', outcome, 'updated', ts)
  redis.call('HDEL', core, 'worker')
  redis.call('ZREM', shared.eligible, id)
  local fields = { 'XADD', shared.stream, 'MAXLEN', '~', shared.maxlen, '*',
    'execution_id', id, 'flow_id', e[1] or '', 'outcome', outcome, 'namespace', e[2] or '',
    'tags', e[3] or '{}', 'occurred_at_ms', ts, 'partition', e[4] or '0' }
  if traceparent then
    fields[#fields + 1], fields[#fields + 2] = 'traceparent', traceparent
  end
  redis.call(unpack(fields))
  local flow = e[1]
  if flow == nil or flow == '' then flow = cjson.null end
  redis.call('PUBLISH', CHANNEL, cjson.encode({ execution_id = id, flow_id = flow, outcome = outcome }))
  for _, child in ipairs(redis.call('SMEMBERS', children)) do
    redis.call('SADD', shared.pending_edges, id .. '|' .. child)
  end
  return true
end

-- The shared keys and trim length of a terminal call whose stream, eligible and pending-edges
-- keys start at `keys[first]`; or nil and the error.
local function shared_of(keys, first, maxlen)
  local n = positive_int(maxlen)
  if not n then return nil, invalid('maxlen must be a positive integer') end
  return { stream = keys[first], eligible = keys[first + 1], pending_edges = keys[first + 2], maxlen = n }
end

-- Functions ----------------------------------------------------------------------------------

-- FCALL ff_demo_version 0 -> the library version.
local function ff_demo_version()
  return VERSION
end

-- FCALL ff_create_flow 1 <flow core> <flow uuid> <namespace> -> 1 (idempotent).
local function ff_create_flow(keys, args)
  local bad = wrong_keys(keys, 1)
  if bad then return bad end
  if not valid_uuid(args[1]) then return invalid('bad flow id') end
  local ns = args[2] or ''
  redis.call('HSETNX', keys[1], 'ns', ns)
  redis.call('HSETNX', keys[1], 'state', 'open')
  redis.call('HSETNX', keys[1], 'created', now_ms())
  return 1
end

-- FCALL ff_create_execution 4|6 <core> <deps> <eligible> <pending edges> [<flow core> <flow members>]
--   <id> <flow uuid or ''> <namespace or ''> <tags JSON object> <max_attempts> <parent id>...
-- -> 'blocked' when it has parents, 'eligible' otherwise.
local function ff_create_execution(keys, args)
  if #keys ~= 4 and #keys ~= 6 then return invalid('expected 4 or 6 keys, got ' .. #keys) end
  local id, flow, ns, tags, max_attempts = args[1], args[2] or '', args[3] or '', args[4] or '{}', args[5]
  local partition = partition_of(id)
  if not partition then return invalid('bad execution id') end
  if flow ~= '' and not valid_uuid(flow) then return invalid('bad flow id') end
  if (flow ~= '') ~= (#keys == 6) then return invalid('flow keys must be passed exactly when a flow is') end
  if not string.match(tags, '^%s*{') or not pcall(cjson.decode, tags) then
    return invalid('tags must be a JSON object')
  end
  if not positive_int(max_attempts) then return invalid('max_attempts must be a positive integer') end
  local parents, seen = {}, {}
  for i = 6, #args do
    local p = args[i]
    if not partition_of(p) then return invalid('bad parent id') end
    if p == id then return invalid('an execution cannot depend on itself') end
    if not seen[p] then
      seen[p] = true
      parents[#parents + 1] = p
    end
  end
  local core, deps, eligible, pending_edges = keys[1], keys[2], keys[3], keys[4]
  if redis.call('EXISTS', core) == 1 then return conflict('execution ' .. id .. ' exists') end
  if flow ~= '' and redis.call('EXISTS', keys[5]) == 0 then return conflict('flow ' .. flow .. ' does not exist') end
  for _, p in ipairs(parents) do
    if redis.call('EXISTS', exec_key(p, 'core')) == 0 then return conflict('parent ' .. p .. ' does not exist') end
  end
  local ts = now_ms()
  local initial = (#parents == 0) and 'eligible' or 'blocked'
  redis.call('HSET', core, 'state', initial, 'attempt', 0, 'max_attempts', max_attempts, 'pending', #parents,
    'flow', flow, 'ns', ns, 'tags', tags, 'partition', partition, 'created', ts, 'updated', ts)
  for _, p in ipairs(parents) do
    redis.call('SADD', exec_key(p, 'children'), id)
    redis.call('HSET', deps, p, 'pending')
    if TERMINAL[redis.call('HGET', exec_key(p, 'core'), 'state') or ''] then
      -- The edge lives with its parent, where the parent's own completion puts its edges.
      local set = pending_edges
      if partition_of(p) ~= partition then set = pending_key(p) end
      redis.call('SADD', set, p .. '|' .. id)
    end
  end
  if flow ~= '' then redis.call('SADD', keys[6], id) end
  if initial == 'eligible' then redis.call('ZADD', eligible, ts, id) end
  return initial
end

-- Appends an event of `family` (lease_history | signal_delivery) about execution `id` (core
-- key `core`) of kind `kind` to `stream` and wakes readers on FAMILY_CHANNEL. `extra` lists
-- more field names and values; empty values are left out.
local function emit(stream, maxlen, id, core, family, kind, extra)
  local args = { 'XADD', stream, 'MAXLEN', '~', maxlen, '*', 'family', family, 'execution_id', id,
    'outcome', kind, 'namespace', redis.call('HGET', core, 'ns') or '', 'occurred_at_ms', now_ms(),
    'partition', partition_of(id) }
  for i = 1, #extra, 2 do
    local v = extra[i + 1]
    if v and v ~= '' then
      args[#args + 1] = extra[i]
      args[#args + 1] = v
    end
  end
  redis.call(unpack(args))
  redis.call('PUBLISH', FAMILY_CHANNEL, cjson.encode({ execution_id = id, family = family }))
end

-- Gives `id` a new lease for `worker` until now + `lease_ms` and writes `acquired`, or
-- `reclaimed` when its previous lease expired.
local function lease(id, core, worker, lease_ms, keys, maxlen)
  local ts = now_ms()
  local attempt = redis.call('HGET', core, 'attempt') or '0'
  local kind = (redis.call('HGET', core, 'lease_state') == 'expired') and 'reclaimed' or 'acquired'
  local lease_id = ts .. '-' .. attempt
  redis.call('HSET', core, 'lease_id', lease_id, 'lease_state', 'active', 'lease_expires', ts + lease_ms)
  redis.call('ZADD', keys.expiry, ts + lease_ms, id)
  emit(keys.stream, maxlen, id, core, 'lease_history', kind, { 'lease_id', lease_id, 'worker', worker })
end

-- FCALL ff_claim 3 <eligible> <stream> <lease expiry> <worker> <limit> <lease ms> <maxlen>
-- -> the claimed ids, oldest first; each gets a new lease (acquired | reclaimed).
local function ff_claim(keys, args)
  local bad = wrong_keys(keys, 3)
  if bad then return bad end
  local worker, limit, lease_ms, maxlen = args[1], positive_int(args[2]), positive_int(args[3]), positive_int(args[4])
  if not worker or worker == '' then return invalid('worker required') end
  if not limit then return invalid('limit must be a positive integer') end
  if not lease_ms then return invalid('lease ms must be a positive integer') end
  if not maxlen then return invalid('maxlen must be a positive integer') end
  local claimed = {}
  for _, id in ipairs(redis.call('ZRANGE', keys[1], 0, limit - 1)) do
    redis.call('ZREM', keys[1], id)
    local core = exec_key(id, 'core')
    if redis.call('HGET', core, 'state') == 'eligible' then
      redis.call('HSET', core, 'state', 'running', 'worker', worker, 'updated', now_ms())
      redis.call('HINCRBY', core, 'attempt', 1)
      lease(id, core, worker, lease_ms, { stream = keys[2], expiry = keys[3] }, maxlen)
      claimed[#claimed + 1] = id
    end
  end
  return claimed
end

-- FCALL ff_renew_lease 3 <core> <stream> <lease expiry> <id> <worker> <lease ms> <maxlen>
-- -> 1 when `worker` held the active lease (now extended, `renewed` written), 0 otherwise.
local function ff_renew_lease(keys, args)
  local bad = wrong_keys(keys, 3)
  if bad then return bad end
  local id, worker, lease_ms, maxlen = args[1], args[2], positive_int(args[3]), positive_int(args[4])
  if not partition_of(id) then return invalid('bad execution id') end
  if not worker or worker == '' then return invalid('worker required') end
  if not lease_ms or not maxlen then return invalid('lease ms and maxlen must be positive integers') end
  local e = redis.call('HMGET', keys[1], 'state', 'worker', 'lease_state', 'lease_id')
  if e[1] ~= 'running' or e[2] ~= worker or e[3] ~= 'active' then return 0 end
  local ends = now_ms() + lease_ms
  redis.call('HSET', keys[1], 'lease_expires', ends)
  redis.call('ZADD', keys[3], ends, id)
  emit(keys[2], maxlen, id, keys[1], 'lease_history', 'renewed', { 'lease_id', e[4], 'worker', worker })
  return 1
end

-- Ends the active lease of running execution `id` as `how` (expired | revoked): it is eligible
-- again and the event names the lease and its holder. False when it holds no active lease.
local function end_lease(id, core, how, revoked_by, keys, maxlen)
  local e = redis.call('HMGET', core, 'state', 'worker', 'lease_state', 'lease_id')
  redis.call('ZREM', keys.expiry, id)
  if e[1] ~= 'running' or e[3] ~= 'active' then return false end
  redis.call('HSET', core, 'lease_state', how)
  redis.call('HDEL', core, 'worker')
  make_eligible(core, id, keys.eligible)
  emit(keys.stream, maxlen, id, core, 'lease_history', how,
    { 'lease_id', e[4], 'worker', e[2], 'revoked_by', revoked_by })
  return true
end

-- FCALL ff_expire_leases 3 <lease expiry> <stream> <eligible> <now ms> <maxlen>
-- -> the executions of this partition whose lease ended before <now ms>, each eligible again
-- with an `expired` event.
local function ff_expire_leases(keys, args)
  local bad = wrong_keys(keys, 3)
  if bad then return bad end
  local now, maxlen = tonumber(args[1]), positive_int(args[2])
  if now == nil or not maxlen then return invalid('now must be a number and maxlen a positive integer') end
  local swept = {}
  local k = { expiry = keys[1], stream = keys[2], eligible = keys[3] }
  -- An entry whose execution finished, suspended or lost its lease otherwise is only removed.
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', keys[1], '-inf', '(' .. args[1])) do
    if end_lease(id, exec_key(id, 'core'), 'expired', '', k, maxlen) then swept[#swept + 1] = id end
  end
  return swept
end

-- FCALL ff_revoke_lease 4 <core> <stream> <eligible> <lease expiry> <id> <revoked by> <maxlen>
-- -> 1 when it held an active lease (now revoked, eligible again), 0 otherwise.
local function ff_revoke_lease(keys, args)
  local bad = wrong_keys(keys, 4)
  if bad then return bad end
  local id, by, maxlen = args[1], args[2], positive_int(args[3])
  if not partition_of(id) then return invalid('bad execution id') end
  if not by or by == '' then return invalid('revoked by required') end
  if not maxlen then return invalid('maxlen must be a positive integer') end
  local k = { stream = keys[2], eligible = keys[3], expiry = keys[4] }
  return end_lease(id, keys[1], 'revoked', by, k, maxlen) and 1 or 0
end

-- FCALL ff_suspend 5 <core> <eligible> <lease expiry> <waitpoints> <buffered> <id> <waitpoint>
-- -> 1 when a buffered signal was consumed (waitpoint satisfied, eligible again), 0 when the
-- waitpoint is open, 'not_running' when it was not running. The lease is released.
local function ff_suspend(keys, args)
  local bad = wrong_keys(keys, 5)
  if bad then return bad end
  local id, wp = args[1], args[2]
  if not partition_of(id) then return invalid('bad execution id') end
  if not wp or wp == '' then return invalid('waitpoint required') end
  local core = keys[1]
  if redis.call('HGET', core, 'state') ~= 'running' then return 'not_running' end
  redis.call('HSET', core, 'state', 'suspended', 'lease_state', 'released', 'updated', now_ms())
  redis.call('HDEL', core, 'worker')
  redis.call('ZREM', keys[3], id)
  if (tonumber(redis.call('HGET', keys[5], wp)) or 0) > 0 then
    redis.call('HINCRBY', keys[5], wp, -1)
    redis.call('HSET', keys[4], wp, 'satisfied')
    make_eligible(core, id, keys[2])
    return 1
  end
  redis.call('HSET', keys[4], wp, 'open')
  return 0
end

-- FCALL ff_deliver_signal 6 <core> <stream> <eligible> <waitpoints> <buffered> <signal keys>
--   <id> <waitpoint> <signal id> <idempotency key or ''> <source identity or ''> <maxlen>
-- -> deduped (the key was delivered before) | satisfied (the waitpoint was open: satisfied,
-- a suspended execution eligible again) | buffered (consumed when it opens) |
-- no_such_execution; a signal-delivery event for each but the last.
local function ff_deliver_signal(keys, args)
  local bad = wrong_keys(keys, 6)
  if bad then return bad end
  if #args ~= 6 then return invalid('expected 6 arguments, got ' .. #args) end
  local id, wp, signal, key, source, maxlen = args[1], args[2], args[3], args[4], args[5], positive_int(args[6])
  if not partition_of(id) then return invalid('bad execution id') end
  if wp == '' or signal == '' then return invalid('waitpoint and signal id required') end
  if not maxlen then return invalid('maxlen must be a positive integer') end
  local core = keys[1]
  if redis.call('EXISTS', core) == 0 then return 'no_such_execution' end
  local effect
  if key ~= '' and redis.call('SISMEMBER', keys[6], key) == 1 then
    effect = 'deduped'
  else
    if key ~= '' then redis.call('SADD', keys[6], key) end
    if redis.call('HGET', keys[4], wp) == 'open' then
      effect = 'satisfied'
      redis.call('HSET', keys[4], wp, 'satisfied')
      if redis.call('HGET', core, 'state') == 'suspended' then make_eligible(core, id, keys[3]) end
    else
      effect = 'buffered'
      redis.call('HINCRBY', keys[5], wp, 1)
    end
  end
  emit(keys[2], maxlen, id, core, 'signal_delivery', effect,
    { 'signal_id', signal, 'waitpoint_id', wp, 'source_identity', source })
  return effect
end

-- The id, its keys and the shared keys of a terminal call on one execution:
-- KEYS <core> <children> <stream> <eligible> <pending edges>, ARGV <id> ... <maxlen> (`nargs` in all).
local function terminal_call(keys, args, nargs)
  local bad = wrong_keys(keys, 5)
  if bad then return nil, bad end
  if #args ~= nargs then return nil, invalid('expected ' .. nargs .. ' arguments, got ' .. #args) end
  if not partition_of(args[1]) then return nil, invalid('bad execution id') end
  local shared, err = shared_of(keys, 3, args[#args])
  if not shared then return nil, err end
  return { id = args[1], core = keys[1], children = keys[2], shared = shared }
end

-- FCALL ff_complete 5 <core> <children> <stream> <eligible> <pending edges> <id> <maxlen>
-- -> 1 when it was running and is now success, 0 otherwise.
local function ff_complete(keys, args)
  local c, err = terminal_call(keys, args, 2)
  if not c then return err end
  return finish(c.id, c.core, c.children, 'success', RUNNING, c.shared) and 1 or 0
end

-- FCALL ff_complete_traced 5 <core> <children> <stream> <eligible> <pending edges> <id> <traceparent>
--   <maxlen>
-- -> as ff_complete; the completion's stream entry carries the producer's W3C `traceparent`
-- (55 characters of lowercase hex and dashes: the readers check the rest).
local function ff_complete_traced(keys, args)
  local c, err = terminal_call(keys, args, 3)
  if not c then return err end
  if not string.match(args[2], '^[0-9a-f%-]+$') or #args[2] ~= 55 then return invalid('bad traceparent') end
  return finish(c.id, c.core, c.children, 'success', RUNNING, c.shared, args[2]) and 1 or 0
end

-- FCALL ff_fail 5 <core> <children> <stream> <eligible> <pending edges> <id> <0|1 retryable> <maxlen>
-- -> 'retry_scheduled' (eligible again) | 'terminal_failed' | 'not_running'.
local function ff_fail(keys, args)
  local c, err = terminal_call(keys, args, 3)
  if not c then return err end
  if args[2] ~= '0' and args[2] ~= '1' then return invalid('retryable must be 0 or 1') end
  local e = redis.call('HMGET', c.core, 'state', 'attempt', 'max_attempts')
  if e[1] ~= 'running' then return 'not_running' end
  if args[2] == '1' and (tonumber(e[2]) or 0) < (tonumber(e[3]) or 1) then
    redis.call('HDEL', c.core, 'worker')
    make_eligible(c.core, c.id, c.shared.eligible)
    return 'retry_scheduled'
  end
  finish(c.id, c.core, c.children, 'failed', RUNNING, c.shared)
  return 'terminal_failed'
end

-- FCALL ff_cancel 5 <core> <children> <stream> <eligible> <pending edges> <id> <maxlen>
-- -> 1 when it was not terminal and is now cancelled, 0 otherwise.
local function ff_cancel(keys, args)
  local c, err = terminal_call(keys, args, 2)
  if not c then return err end
  return finish(c.id, c.core, c.children, 'cancelled', OPEN, c.shared) and 1 or 0
end

-- FCALL ff_expire 5 <core> <children> <stream> <eligible> <pending edges> <id> <maxlen>
-- -> 1 when it was not terminal and is now expired, 0 otherwise.
local function ff_expire(keys, args)
  local c, err = terminal_call(keys, args, 2)
  if not c then return err end
  return finish(c.id, c.core, c.children, 'expired', OPEN, c.shared) and 1 or 0
end

-- FCALL ff_cancel_flow 5 <flow core> <flow members> <stream> <eligible> <pending edges>
--   <policy flow_only|cancel_all|cancel_pending> <maxlen>
-- -> how many members were cancelled, in creation order.
local function ff_cancel_flow(keys, args)
  local bad = wrong_keys(keys, 5)
  if bad then return bad end
  local policies = { flow_only = {}, cancel_all = OPEN, cancel_pending = PENDING }
  local states = policies[args[1] or '']
  if not states then return invalid('unknown cancel policy') end
  local shared, err = shared_of(keys, 3, args[2])
  if not shared then return err end
  if redis.call('EXISTS', keys[1]) == 1 then redis.call('HSET', keys[1], 'state', 'cancelled') end
  local members = {}
  for _, id in ipairs(redis.call('SMEMBERS', keys[2])) do
    members[#members + 1] = { id = id, created = tonumber(redis.call('HGET', exec_key(id, 'core'), 'created')) or 0 }
  end
  table.sort(members, function(a, b)
    if a.created ~= b.created then return a.created < b.created end
    return a.id < b.id
  end)
  local n = 0
  for _, m in ipairs(members) do
    if finish(m.id, exec_key(m.id, 'core'), exec_key(m.id, 'children'), 'cancelled', states, shared) then
      n = n + 1
    end
  end
  return n
end

-- FCALL ff_resolve_dependency 7 <parent core> <child core> <child deps> <child children>
--   <child's stream> <child's eligible> <parent's pending edges> <parent id> <child id> <maxlen>
-- -> promoted | skipped | waiting | already_resolved | parent_not_terminal.
local function ff_resolve_dependency(keys, args)
  local bad = wrong_keys(keys, 7)
  if bad then return bad end
  local parent, child = args[1], args[2]
  if not partition_of(parent) or not partition_of(child) then return invalid('bad execution id') end
  local shared, err = shared_of(keys, 5, args[3])
  if not shared then return err end
  local parent_core, child_core, deps, child_children = keys[1], keys[2], keys[3], keys[4]
  local parent_state = redis.call('HGET', parent_core, 'state')
  if not TERMINAL[parent_state or ''] then return 'parent_not_terminal' end
  if redis.call('HGET', deps, parent) ~= 'pending' then return 'already_resolved' end
  redis.call('SREM', shared.pending_edges, parent .. '|' .. child)
  if parent_state ~= 'success' then
    redis.call('HSET', deps, parent, 'failed')
    if finish(child, child_core, child_children, 'skipped', PENDING, shared) then return 'skipped' end
    return 'already_resolved'
  end
  redis.call('HSET', deps, parent, 'satisfied')
  local pending = redis.call('HINCRBY', child_core, 'pending', -1)
  redis.call('HSET', child_core, 'updated', now_ms())
  if pending == 0 and redis.call('HGET', child_core, 'state') == 'blocked' then
    make_eligible(child_core, child, shared.eligible)
    return 'promoted'
  end
  return 'waiting'
end

-- FCALL_RO ff_children 1 <children> -> the child ids, sorted.
local function ff_children(keys)
  local bad = wrong_keys(keys, 1)
  if bad then return bad end
  local ids = redis.call('SMEMBERS', keys[1])
  table.sort(ids)
  return ids
end

-- FCALL_RO ff_unresolved 1 <pending edges> <limit> -> up to limit "parent|child" edges whose
-- parent is terminal but which are not resolved yet.
local function ff_unresolved(keys, args)
  local bad = wrong_keys(keys, 1)
  if bad then return bad end
  local limit = positive_int(args[1])
  if not limit then return invalid('limit must be a positive integer') end
  return redis.call('SRANDMEMBER', keys[1], limit)
end

-- FCALL_RO ff_execution 1 <core> -> {state, attempt}, or nil when it does not exist.
local function ff_execution(keys)
  local bad = wrong_keys(keys, 1)
  if bad then return bad end
  local e = redis.call('HMGET', keys[1], 'state', 'attempt')
  if not e[1] then return false end
  return { e[1], tonumber(e[2]) or 0 }
end

redis.register_function { function_name = 'ff_demo_version', callback = ff_demo_version, flags = { 'no-writes' } }
redis.register_function('ff_create_flow', ff_create_flow)
redis.register_function('ff_create_execution', ff_create_execution)
redis.register_function('ff_claim', ff_claim)
redis.register_function('ff_renew_lease', ff_renew_lease)
redis.register_function('ff_expire_leases', ff_expire_leases)
redis.register_function('ff_revoke_lease', ff_revoke_lease)
redis.register_function('ff_suspend', ff_suspend)
redis.register_function('ff_deliver_signal', ff_deliver_signal)
redis.register_function('ff_complete', ff_complete)
redis.register_function('ff_complete_traced', ff_complete_traced)
redis.register_function('ff_fail', ff_fail)
redis.register_function('ff_cancel', ff_cancel)
redis.register_function('ff_expire', ff_expire)
redis.register_function('ff_cancel_flow', ff_cancel_flow)
redis.register_function('ff_resolve_dependency', ff_resolve_dependency)
redis.register_function { function_name = 'ff_children', callback = ff_children, flags = { 'no-writes' } }
redis.register_function { function_name = 'ff_unresolved', callback = ff_unresolved, flags = { 'no-writes' } }
redis.register_function { function_name = 'ff_execution', callback = ff_execution, flags = { 'no-writes' } }
