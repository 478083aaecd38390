#!lua name=ff_completions
-- ff-completions for Valkey (7.2+ / Redis 7+): the subsystem's own function library, loaded by
-- the Rust crate with FUNCTION LOAD REPLACE when `ff_version` answers something else. Bump
-- VERSION together with `LIBRARY_VERSION` in src/backends/valkey/mod.rs. It holds what the
-- subsystem needs and no producer: the readers of the completion streams and the durable
-- groups' store. Every function validates all of its arguments before it writes anything; bad
-- arguments are an error reply starting `ff_completions invalid:`.
--
-- What producers write (a host's own Lua functions; the lab's demo library `ff_demo`), in the
-- one atomic call of each state change:
--   ff:completions:{fp:N}   stream  partition N's events, in the slot of the flow's `{fp:N}`
--                           hash tag. A completion's fields: execution_id, flow_id, outcome
--                           (success | failed | cancelled | expired | skipped), namespace, tags
--                           (JSON object), occurred_at_ms (server TIME), partition, and, when
--                           the producer records its span, traceparent (W3C trace context,
--                           `00-<32 hex>-<16 hex>-<2 hex>`; a malformed one is dropped by the
--                           readers with a logged note, the entry kept). A lease-history
--                           or signal-delivery entry adds `family` (lease_history |
--                           signal_delivery), its kind in `outcome`, and lease_id, worker,
--                           revoked_by, signal_id, waitpoint_id, source_identity where they apply.
--   PUBLISH ff:dag:completions {"execution_id", "flow_id", "outcome"} for a completion, and
--   PUBLISH {ff:dag:completions}:families {"execution_id", "family"} for the other families:
--   wake-ups only (the listener reads the partition a message names).
--   ff:completions          stream  the single stream of versions 1 and 2, still read (never
--                           written) until it is empty
--
-- Durable groups (the rules are in src/backends/groups.rs). A group's keys share the hash tag
-- `{g:<name>}` (never empty, so even a name with braces keeps all of them in one slot; the
-- tag is the text up to the first `}` of the name when it has one):
--   ff:group:{g:<name>}:members      zset  member id -> lease expiry (ms); expired ones are
--                                          removed by the next heartbeat
--   ff:group:{g:<name>}:owner        hash  partition -> holder (absent when free)
--   ff:group:{g:<name>}:expiry       hash  partition -> its holder's lease expiry (ms)
--   ff:group:{g:<name>}:token        hash  partition -> fencing token (all 256 from creation)
--   ff:group:{g:<name>}:acked        hash  partition -> acknowledged stream id `ms-seq` of that
--                                          partition's stream (all 256 from creation; the
--                                          group exists while this key does)
--   ff:group:{g:<name>}:incarnation  hash  member id -> the process (incarnation) that holds it
--   ff:group:{g:<name>}:holder       hash  partition -> its holder's incarnation
--   ff:group:{g:<name>}:pending      hash  partition -> events its holder delivered and had not
--                                          acknowledged at its last heartbeat
--   ff:group:{g:<name>}:retry        hash  partition -> JSON {pos, attempts, reason} of the event
--                                          its consumers refuse now
--   ff:group:{g:<name>}:parked       hash  `<partition>|<ms-seq>` -> JSON {event, reason,
--                                          attempts, at, replay} of a parked event
-- Positions are compared as numbers (ms, then seq), exact below 2^53: the Rust side refuses
-- larger words before calling, and the library refuses them too.

local VERSION = '9'

-- Validation ---------------------------------------------------------------------------------

local function invalid(msg)
  return redis.error_reply('ERR ff_completions invalid: ' .. msg)
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

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Readers ------------------------------------------------------------------------------------

-- FCALL ff_version 0 -> the library version.
local function ff_version()
  return VERSION
end

-- FCALL_RO ff_read_after 1 <stream> <after id> <count>
-- -> {trimmed (0|1), first id or '', last generated id or '', entries}: one atomic look at the
-- stream for readers. `trimmed` is 1 once entries were ever removed (only ids below the first
-- entry can have been trimmed); entries are those after <after>, at most <count> (none for 0).
local function ff_read_after(keys, args)
  local bad = wrong_keys(keys, 1)
  if bad then return bad end
  local after, count = args[1], tonumber(args[2])
  if type(after) ~= 'string' or not string.match(after, '^%d+%-%d+$') then return invalid('bad stream id') end
  if count == nil or count < 0 or count ~= math.floor(count) then return invalid('bad count') end
  if redis.call('EXISTS', keys[1]) == 0 then return { 0, '', '', {} } end
  local info = redis.call('XINFO', 'STREAM', keys[1])
  local m = {}
  for i = 1, #info, 2 do m[info[i]] = info[i + 1] end
  local trimmed = (tonumber(m['entries-added']) or 0) > (tonumber(m['length']) or 0) and 1 or 0
  local first = m['first-entry'] and m['first-entry'][1] or ''
  local entries = {}
  if count > 0 then entries = redis.call('XRANGE', keys[1], '(' .. after, '+', 'COUNT', count) end
  return { trimmed, first, m['last-generated-id'] or '', entries }
end

-- Decimal text `a` is a greater number than `b` (neither has leading zeros).
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

-- Stream id `a` is after stream id `b`.
local function id_after(a, b)
  local am, as = string.match(a, '^(%d+)%-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)%-(%d+)$')
  if am ~= bm then return greater(am, bm) end
  return greater(as, bs)
end

-- FCALL_RO ff_read_streams 1 <routing key> <budget> <stream> <after id> [<stream> <after id> ..]
-- -> {share, lanes}: one atomic look at every listed completion stream this node holds, for a
-- reader at <after id> in each. <routing key> is any key of a slot this node owns (it only
-- routes the call). `lanes` lists, by the 1-based index of the pair, only the streams with
-- entries after the reader, as {index, 'ok', trimmed, first id, last generated id, entries}
-- (as ff_read_after), and the streams this node cannot answer (their slot is served elsewhere,
-- migrating or importing) as {index, 'elsewhere'}: the caller reads those one by one. Entries:
-- <budget> split evenly over the streams with news (at least 8 each, `share`); the single
-- stream of versions 1 and 2 alone while it has news; none for a budget of 0.
local function ff_read_streams(keys, args)
  local bad = wrong_keys(keys, 1)
  if bad then return bad end
  local budget = tonumber(args[1])
  if budget == nil or budget < 0 or budget ~= math.floor(budget) then return invalid('bad budget') end
  if #args % 2 ~= 1 then return invalid('expected <stream> <after id> pairs') end
  local lanes, pending, legacy = {}, {}, nil
  for i = 2, #args, 2 do
    local key, after = args[i], args[i + 1]
    if string.sub(key, 1, 14) ~= 'ff:completions' then return invalid('not a completion stream: ' .. key) end
    if not string.match(after, '^%d+%-%d+$') then return invalid('bad stream id') end
    local index = i / 2
    local exists = redis.pcall('EXISTS', key)
    if type(exists) == 'table' and exists.err then
      lanes[#lanes + 1] = { index, 'elsewhere' }
    elseif exists == 1 then
      local info = redis.call('XINFO', 'STREAM', key)
      local m = {}
      for j = 1, #info, 2 do m[info[j]] = info[j + 1] end
      local last = m['last-generated-id'] or '0-0'
      if id_after(last, after) then
        local trimmed = (tonumber(m['entries-added']) or 0) > (tonumber(m['length']) or 0) and 1 or 0
        local first = m['first-entry'] and m['first-entry'][1] or ''
        local lane = { index, 'ok', trimmed, first, last, {} }
        lanes[#lanes + 1] = lane
        pending[#pending + 1] = { lane, key, after }
        if key == 'ff:completions' then legacy = pending[#pending] end
      end
    end
  end
  if legacy then pending = { legacy } end
  local share = 0
  if budget > 0 and #pending > 0 then
    share = math.min(budget, math.max(math.min(8, budget), math.floor(budget / #pending)))
    for _, p in ipairs(pending) do
      p[1][6] = redis.call('XRANGE', p[2], '(' .. p[3], '+', 'COUNT', share)
    end
  end
  return { share, lanes }
end

-- Durable groups -----------------------------------------------------------------------------

local GROUP_PARTITIONS = 256
local EXACT = 2 ^ 53

-- A group's keys: KEYS <members> <owner> <expiry> <token> <acked> <incarnation> <holder>
-- <pending> <retry> <parked>; or nil and the error.
local function group_of(keys)
  if #keys ~= 10 then return nil, invalid('expected 10 group keys, got ' .. #keys) end
  return {
    members = keys[1], owner = keys[2], expiry = keys[3], token = keys[4], acked = keys[5],
    incarnation = keys[6], holder = keys[7], pending = keys[8], retry = keys[9], parked = keys[10],
  }
end

-- A member id or incarnation: 1 to 256 bytes (64 characters of UTF-8), no ASCII control character.
local function valid_member(m)
  return type(m) == 'string' and #m > 0 and #m <= 256 and not string.find(m, '[%z\1-\31\127]')
end

-- `ms-seq` as {ms, seq} numbers, or nil when malformed or a word is 2^53 or more (a double
-- holds every integer below exactly, so a larger text cannot round below the bound).
local function parse_pos(text)
  if type(text) ~= 'string' then return nil end
  local ms, seq = string.match(text, '^(%d+)%-(%d+)$')
  if not ms or #ms > 16 or #seq > 16 then return nil end
  local m, q = tonumber(ms), tonumber(seq)
  if m >= EXACT or q >= EXACT then return nil end
  return { m, q }
end

-- Position `a` is after position `b`, compared as numbers.
local function pos_after(a, b)
  if a[1] ~= b[1] then return a[1] > b[1] end
  return a[2] > b[2]
end

-- An integral number as decimal text (tostring would switch to exponents above 1e14).
local function int_text(n)
  return string.format('%.0f', n)
end

-- A partition number 0..255 from its text, or nil.
local function partition_arg(text)
  if type(text) ~= 'string' or not string.match(text, '^%d%d?%d?$') then return nil end
  local p = tonumber(text)
  if p >= GROUP_PARTITIONS then return nil end
  return p
end

-- A flat HGETALL reply as a table.
local function hash_table(key)
  local flat, t = redis.call('HGETALL', key), {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

-- Per partition, how many parked events it has and how many of them are to be replayed.
local function parked_counts(g)
  local parked, replays = {}, {}
  for field, value in pairs(hash_table(g.parked)) do
    local p = tonumber(string.match(field, '^(%d+)|'))
    if p then
      parked[p] = (parked[p] or 0) + 1
      local ok, entry = pcall(cjson.decode, value)
      if ok and type(entry) == 'table' and entry.replay then replays[p] = (replays[p] or 0) + 1 end
    end
  end
  return parked, replays
end

-- The member holds partition p with token `token` (a lease that ran out and that nobody took
-- yet still counts).
local function holds(g, member, p, token)
  return redis.call('HGET', g.owner, p) == member and redis.call('HGET', g.token, p) == token
end

-- FCALL ff_group_heartbeat 10 <group keys> <member> <incarnation> <ttl ms> <exclusive|shared>
--   <rejoin 0|1> <unacked: JSON object partition -> count> <start id of partition 0> ..
--   <start id of partition 255>
-- -> {partition, token, acked id, parked, replays} for each partition the incarnation holds,
-- ascending; or {'superseded'} with nothing written when another incarnation holds the member id
-- and this is not a rejoin. One atomic heartbeat as src/backends/groups.rs describes.
local function ff_group_heartbeat(keys, args)
  local g, err = group_of(keys)
  if not g then return err end
  if #args ~= 6 + GROUP_PARTITIONS then
    return invalid('expected ' .. (6 + GROUP_PARTITIONS) .. ' arguments, got ' .. #args)
  end
  local member, incarnation, ttl, sharing, rejoin = args[1], args[2], positive_int(args[3]), args[4], args[5]
  if not valid_member(member) then return invalid('bad member id') end
  if not valid_member(incarnation) then return invalid('bad incarnation') end
  if not ttl then return invalid('ttl must be a positive integer (ms)') end
  if sharing ~= 'exclusive' and sharing ~= 'shared' then return invalid('sharing must be exclusive or shared') end
  if rejoin ~= '0' and rejoin ~= '1' then return invalid('rejoin must be 0 or 1') end
  local ok, unacked = pcall(cjson.decode, args[6])
  if not ok or type(unacked) ~= 'table' then return invalid('unacked must be a JSON object') end
  for i = 7, #args do
    if not parse_pos(args[i]) then return invalid('bad start id ' .. args[i]) end
  end
  local now = now_ms()
  redis.call('ZREMRANGEBYSCORE', g.members, '-inf', int_text(now))
  if redis.call('ZSCORE', g.members, member) then
    local live = redis.call('HGET', g.incarnation, member)
    if rejoin == '0' and live ~= incarnation then return { 'superseded' } end
  end
  if redis.call('EXISTS', g.acked) == 0 then
    local acked, tokens = {}, {}
    for p = 0, GROUP_PARTITIONS - 1 do
      acked[#acked + 1], acked[#acked + 2] = p, args[7 + p]
      tokens[#tokens + 1], tokens[#tokens + 2] = p, 0
    end
    redis.call('HSET', g.acked, unpack(acked))
    redis.call('HSET', g.token, unpack(tokens))
  end
  local expires = int_text(now + ttl)
  redis.call('ZADD', g.members, expires, member)
  redis.call('HSET', g.incarnation, member, incarnation)
  local owners, expiries, holders = hash_table(g.owner), hash_table(g.expiry), hash_table(g.holder)
  local held, mine = {}, {}
  for p = 0, GROUP_PARTITIONS - 1 do
    local key = tostring(p)
    if owners[key] == member then
      held[#held + 1], mine[p] = p, true
      if rejoin == '1' or holders[key] ~= incarnation then
        redis.call('HINCRBY', g.token, p, 1)
        redis.call('HSET', g.holder, p, incarnation)
        redis.call('HSET', g.pending, p, 0)
      else
        redis.call('HSET', g.pending, p, tonumber(unacked[key]) or 0)
      end
    end
  end
  local share = GROUP_PARTITIONS
  if sharing == 'shared' then share = math.ceil(GROUP_PARTITIONS / math.max(1, redis.call('ZCARD', g.members))) end
  while #held > share do
    local p = table.remove(held)
    redis.call('HDEL', g.owner, p)
    redis.call('HDEL', g.expiry, p)
    redis.call('HDEL', g.holder, p)
    redis.call('HDEL', g.pending, p)
  end
  for p = 0, GROUP_PARTITIONS - 1 do
    if #held >= share then break end
    local key = tostring(p)
    if not mine[p] and (owners[key] == nil or (tonumber(expiries[key]) or 0) <= now) then
      redis.call('HSET', g.owner, p, member)
      redis.call('HSET', g.holder, p, incarnation)
      redis.call('HSET', g.pending, p, 0)
      redis.call('HINCRBY', g.token, p, 1)
      held[#held + 1] = p
    end
  end
  table.sort(held)
  local reply = {}
  if #held > 0 then
    local renew = {}
    for _, p in ipairs(held) do renew[#renew + 1], renew[#renew + 2] = p, expires end
    redis.call('HSET', g.expiry, unpack(renew))
    local tokens = redis.call('HMGET', g.token, unpack(held))
    local acked = redis.call('HMGET', g.acked, unpack(held))
    local parked, replays = parked_counts(g)
    for i, p in ipairs(held) do
      reply[i] = { p, tonumber(tokens[i]) or 0, acked[i] or '0-0', parked[p] or 0, replays[p] or 0 }
    end
  end
  return reply
end

-- <member> [<partition> <token> <position id>].. as {member, acks} or nil and the error.
local function fenced_args(args)
  local member = args[1]
  if not valid_member(member) then return nil, invalid('bad member id') end
  if (#args - 1) % 3 ~= 0 then return nil, invalid('expected <partition> <token> <position id> triples') end
  local acks = {}
  for i = 2, #args, 3 do
    local p, token, pos = partition_arg(args[i]), args[i + 1], parse_pos(args[i + 2])
    if not p then return nil, invalid('bad partition ' .. args[i]) end
    if not string.match(token, '^%d+$') then return nil, invalid('bad token ' .. token) end
    if not pos then return nil, invalid('bad position ' .. args[i + 2]) end
    acks[#acks + 1] = { p = p, token = token, pos = pos, text = args[i + 2] }
  end
  return { member = member, acks = acks }
end

-- FCALL ff_group_ack 10 <group keys> <member> [<partition> <token> <position id>]..
-- -> {'ok'} with every acknowledged position raised (never lowered), or {'fenced', partition}
-- with nothing written when the member does not hold one of the partitions with that token (a
-- lease that ran out and that nobody took yet still counts: only a takeover, which raises the
-- token, moves events to another member). An unknown group is invalid.
local function ff_group_ack(keys, args)
  local g, err = group_of(keys)
  if not g then return err end
  local call, bad = fenced_args(args)
  if not call then return bad end
  if redis.call('EXISTS', g.acked) == 0 then return invalid('unknown group') end
  for _, a in ipairs(call.acks) do
    if not holds(g, call.member, a.p, a.token) then return { 'fenced', a.p } end
  end
  for _, a in ipairs(call.acks) do
    local stored = parse_pos(redis.call('HGET', g.acked, a.p))
    if not stored or pos_after(a.pos, stored) then redis.call('HSET', g.acked, a.p, a.text) end
  end
  return { 'ok' }
end

-- FCALL ff_group_settle 10 <group keys> <member> [<partition> <token> <position id>]..
-- -> {'ok', removed} with each replayed parked event named removed, or {'fenced', partition}
-- with nothing written (as ff_group_ack).
local function ff_group_settle(keys, args)
  local g, err = group_of(keys)
  if not g then return err end
  local call, bad = fenced_args(args)
  if not call then return bad end
  if redis.call('EXISTS', g.acked) == 0 then return invalid('unknown group') end
  for _, a in ipairs(call.acks) do
    if not holds(g, call.member, a.p, a.token) then return { 'fenced', a.p } end
  end
  local removed = 0
  for _, a in ipairs(call.acks) do
    removed = removed + redis.call('HDEL', g.parked, a.p .. '|' .. a.text)
  end
  return { 'ok', removed }
end

-- FCALL ff_group_nack 10 <group keys> <member> <partition> <token> <position id> <reason>
--   <park after> <event JSON> <replayed 0|1>
-- -> {'retry', attempts} or {'parked', attempts}, or {'fenced', partition} with nothing written.
-- A replayed parked event counts one more attempt and stays parked (no longer to replay).
-- Otherwise attempts on one position are counted on the partition; at <park after> the event
-- is parked and the partition's position moves past it.
local function ff_group_nack(keys, args)
  local g, err = group_of(keys)
  if not g then return err end
  if #args ~= 8 then return invalid('expected 8 arguments, got ' .. #args) end
  local member, p, token, pos, reason = args[1], partition_arg(args[2]), args[3], parse_pos(args[4]), args[5]
  local park_after, event, replayed = positive_int(args[6]), args[7], args[8]
  if not valid_member(member) then return invalid('bad member id') end
  if not p then return invalid('bad partition ' .. args[2]) end
  if not string.match(token, '^%d+$') then return invalid('bad token ' .. token) end
  if not pos then return invalid('bad position ' .. args[4]) end
  if not park_after then return invalid('park after must be a positive integer') end
  if replayed ~= '0' and replayed ~= '1' then return invalid('replayed must be 0 or 1') end
  if redis.call('EXISTS', g.acked) == 0 then return invalid('unknown group') end
  if not holds(g, member, p, token) then return { 'fenced', p } end
  local field = p .. '|' .. args[4]
  if replayed == '1' then
    local stored = redis.call('HGET', g.parked, field)
    if not stored then return { 'parked', 0 } end
    local entry = cjson.decode(stored)
    entry.attempts = (tonumber(entry.attempts) or 0) + 1
    entry.reason, entry.replay = reason, false
    redis.call('HSET', g.parked, field, cjson.encode(entry))
    return { 'parked', entry.attempts }
  end
  local attempts = 1
  local retry = redis.call('HGET', g.retry, p)
  if retry then
    local ok, r = pcall(cjson.decode, retry)
    if ok and type(r) == 'table' and r.pos == args[4] then attempts = (tonumber(r.attempts) or 0) + 1 end
  end
  if attempts >= park_after then
    redis.call('HSET', g.parked, field,
      cjson.encode({ event = event, reason = reason, attempts = attempts, at = now_ms(), replay = false }))
    local stored = parse_pos(redis.call('HGET', g.acked, p))
    if not stored or pos_after(pos, stored) then redis.call('HSET', g.acked, p, args[4]) end
    redis.call('HSET', g.retry, p, cjson.encode({ attempts = 0, reason = reason }))
    return { 'parked', attempts }
  end
  redis.call('HSET', g.retry, p, cjson.encode({ pos = args[4], attempts = attempts, reason = reason }))
  return { 'retry', attempts }
end

-- FCALL ff_group_leave 10 <group keys> <member> <incarnation> -> how many partitions it freed
-- (tokens kept); only the incarnation's own: a newer incarnation's membership and partitions
-- stay. Nothing changes for an unknown group or member.
local function ff_group_leave(keys, args)
  local g, err = group_of(keys)
  if not g then return err end
  local member, incarnation = args[1], args[2]
  if not valid_member(member) then return invalid('bad member id') end
  if not valid_member(incarnation) then return invalid('bad incarnation') end
  if redis.call('HGET', g.incarnation, member) == incarnation then
    redis.call('ZREM', g.members, member)
    redis.call('HDEL', g.incarnation, member)
  end
  local freed = 0
  local holders = hash_table(g.holder)
  for p, owner in pairs(hash_table(g.owner)) do
    if owner == member and holders[p] == incarnation then
      redis.call('HDEL', g.owner, p)
      redis.call('HDEL', g.expiry, p)
      redis.call('HDEL', g.holder, p)
      redis.call('HDEL', g.pending, p)
      freed = freed + 1
    end
  end
  return freed
end

-- FCALL ff_group_move 10 <group keys> <force 0|1> [<partition> <position id>]..
-- -> {'ok', moved} with each position set (up or down) and its token raised, or
-- {'held', partition, member} with nothing written when a member holds one of them with an
-- unexpired lease and force is 0. An unknown group is invalid.
local function ff_group_move(keys, args)
  local g, err = group_of(keys)
  if not g then return err end
  local force = args[1]
  if force ~= '0' and force ~= '1' then return invalid('force must be 0 or 1') end
  if #args % 2 ~= 1 then return invalid('expected <partition> <position id> pairs') end
  local moves = {}
  for i = 2, #args, 2 do
    local p = partition_arg(args[i])
    if not p then return invalid('bad partition ' .. args[i]) end
    if not parse_pos(args[i + 1]) then return invalid('bad position ' .. args[i + 1]) end
    moves[#moves + 1] = { p = p, text = args[i + 1] }
  end
  if redis.call('EXISTS', g.acked) == 0 then return invalid('unknown group') end
  if force == '0' then
    local now = now_ms()
    for _, m in ipairs(moves) do
      local owner = redis.call('HGET', g.owner, m.p)
      if owner and (tonumber(redis.call('HGET', g.expiry, m.p)) or 0) > now then return { 'held', m.p, owner } end
    end
  end
  for _, m in ipairs(moves) do
    redis.call('HSET', g.acked, m.p, m.text)
    redis.call('HINCRBY', g.token, m.p, 1)
    redis.call('HDEL', g.retry, m.p)
  end
  return { 'ok', #moves }
end

-- FCALL_RO ff_group_parked 10 <group keys> -> {partition, position id, event, reason, attempts,
-- parked at ms, replay 0|1} of every parked event.
local function ff_group_parked(keys)
  local g, err = group_of(keys)
  if not g then return err end
  local out = {}
  for field, value in pairs(hash_table(g.parked)) do
    local p, pos = string.match(field, '^(%d+)|(.+)$')
    local ok, entry = pcall(cjson.decode, value)
    if p and ok and type(entry) == 'table' then
      out[#out + 1] = {
        tonumber(p), pos, entry.event or '', entry.reason or '', tonumber(entry.attempts) or 0,
        int_text(tonumber(entry.at) or 0), entry.replay and 1 or 0,
      }
    end
  end
  return out
end

-- FCALL ff_group_parked_mark 10 <group keys> <replay|discard> [<partition> <position id>]..
-- -> how many parked events were marked for replay or removed (every one when none is named).
local function ff_group_parked_mark(keys, args)
  local g, err = group_of(keys)
  if not g then return err end
  local mark = args[1]
  if mark ~= 'replay' and mark ~= 'discard' then return invalid('mark must be replay or discard') end
  if #args % 2 ~= 1 then return invalid('expected <partition> <position id> pairs') end
  local fields = {}
  if #args == 1 then
    for field in pairs(hash_table(g.parked)) do fields[#fields + 1] = field end
  else
    for i = 2, #args, 2 do
      local p = partition_arg(args[i])
      if not p then return invalid('bad partition ' .. args[i]) end
      if not parse_pos(args[i + 1]) then return invalid('bad position ' .. args[i + 1]) end
      fields[#fields + 1] = p .. '|' .. args[i + 1]
    end
  end
  local n = 0
  for _, field in ipairs(fields) do
    local stored = redis.call('HGET', g.parked, field)
    if stored then
      n = n + 1
      if mark == 'discard' then
        redis.call('HDEL', g.parked, field)
      else
        local entry = cjson.decode(stored)
        entry.replay = true
        redis.call('HSET', g.parked, field, cjson.encode(entry))
      end
    end
  end
  return n
end

-- FCALL_RO ff_group_view 10 <group keys> -> false for a group never created, else
-- {members, partitions}: members {id, expiry ms} with an unexpired lease, by expiry;
-- partitions {owner or '', expiry or 0, token, acked id, unacked, attempts, reason or '', parked}
-- for 0..255.
local function ff_group_view(keys)
  local g, err = group_of(keys)
  if not g then return err end
  if redis.call('EXISTS', g.acked) == 0 then return false end
  local now = now_ms()
  local flat = redis.call('ZRANGEBYSCORE', g.members, '(' .. int_text(now), '+inf', 'WITHSCORES')
  local members = {}
  for i = 1, #flat, 2 do members[#members + 1] = { flat[i], tonumber(flat[i + 1]) or 0 } end
  local owners, expiries = hash_table(g.owner), hash_table(g.expiry)
  local tokens, acked, pending, retries = hash_table(g.token), hash_table(g.acked), hash_table(g.pending), hash_table(g.retry)
  local parked = parked_counts(g)
  local partitions = {}
  for p = 0, GROUP_PARTITIONS - 1 do
    local key = tostring(p)
    local attempts, reason = 0, ''
    if retries[key] then
      local ok, r = pcall(cjson.decode, retries[key])
      if ok and type(r) == 'table' then attempts, reason = tonumber(r.attempts) or 0, r.reason or '' end
    end
    partitions[p + 1] = {
      owners[key] or '', tonumber(expiries[key]) or 0, tonumber(tokens[key]) or 0, acked[key] or '0-0',
      tonumber(pending[key]) or 0, attempts, reason, parked[p] or 0,
    }
  end
  return { members, partitions }
end

redis.register_function { function_name = 'ff_version', callback = ff_version, flags = { 'no-writes' } }
redis.register_function { function_name = 'ff_read_after', callback = ff_read_after, flags = { 'no-writes' } }
redis.register_function {
  function_name = 'ff_read_streams', callback = ff_read_streams, flags = { 'no-writes', 'allow-cross-slot-keys' },
}
redis.register_function('ff_group_heartbeat', ff_group_heartbeat)
redis.register_function('ff_group_ack', ff_group_ack)
redis.register_function('ff_group_settle', ff_group_settle)
redis.register_function('ff_group_nack', ff_group_nack)
redis.register_function('ff_group_leave', ff_group_leave)
redis.register_function('ff_group_move', ff_group_move)
redis.register_function('ff_group_parked_mark', ff_group_parked_mark)
redis.register_function { function_name = 'ff_group_parked', callback = ff_group_parked, flags = { 'no-writes' } }
redis.register_function { function_name = 'ff_group_view', callback = ff_group_view, flags = { 'no-writes' } }
