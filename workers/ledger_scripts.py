"""The ledger's Lua scripts (farebox/stages/ledger.py says how they divide the work): each in one owner's slot,
and the one-server record that runs them all at once (``WHOLE``).
"""

from __future__ import annotations

from farebox.stages.lua import Layout

# The release of a coalescing lease this job holds, ending both release scripts below (the record's, for a job's
# own lease; the cache fill's, for a shared entry's). It wakes the lease's waiters, if one said it waits (the dedup
# decide scripts set the flag) and the lease was this job's or is gone (expired): one PUBLISH, atomic with the
# release. Another job's lease is left alone, and so are its waiters.
RELEASE = """
if lease_owner ~= '' then
  local lease = redis.call('GET', lease_key)
  if lease == lease_owner then
    redis.call('DEL', lease_key)
  end
  if (lease == lease_owner or not lease) and redis.call('DEL', waiters_key) == 1 then
    redis.pcall('PUBLISH', wake_channel, lease_key)  -- a hint: an ACL without the channel must not fail the write
  end
end
"""

# The exactly-once part, in the job's slot. ``fresh``: this call wrote the entry; else the entry already there
# (its folds are repeated, idempotently, while it is young). A job's own coalescing lease (not a shared cache
# entry's) sits here too and is released with the result stored, so a copy never leads in between.
RECORD_LAYOUT = Layout(
    keys=("result_key", "entry_key", "prompt_key", "lease_key", "waiters_key"),
    args=(
        "result_json",
        "result_ttl_s",
        "entry_json",
        "entry_ttl_s",
        "prompt_json",  # the messages as sent, kept for `farebox feedback export`; '' when not kept
        "prompt_ttl_s",
        "lease_owner",  # the job record when the job holds its own lease, else ''
        "wake_channel",  # where a released lease's waiters are woken (farebox/stages/wake.py)
    ),
)
RECORD_HEAD = """
local existing = redis.call('GET', result_key)
local fresh = 0
local entry = false
if not existing and redis.call('SET', entry_key, entry_json, 'NX', 'EX', entry_ttl_s) then
  fresh = 1
  if prompt_json ~= '' then
    redis.call('SET', prompt_key, prompt_json, 'EX', prompt_ttl_s)
  end
else
  entry = redis.call('GET', entry_key)
end
if not existing then
  redis.call('SET', result_key, result_json, 'EX', result_ttl_s)
end
"""
RECORD = (
    RECORD_HEAD
    + RELEASE
    + """
return {existing or false, fresh, entry}
"""
)

# The aggregates, in the ledger's slot: once per record (the marker hash of the entry's day). Also the end of a
# cache hit recorded in one round trip (farebox/stages/one_trip.py).
FOLD_LAYOUT = Layout(
    keys=("folded_key", "day_key", "days_key", "stream_key", "arms_key"),
    args=(
        "record",
        "folded_expires_at",
        "entry_json",
        "field_prefix",  # "tenant|provider|model|" of this job's aggregate fields
        "cost_nusd",
        "baseline_nusd",
        "input_tokens",
        "output_tokens",
        "cache_hit",  # 1 or 0
        "is_error",  # 1 or 0
        "day",
        "day_expires_at",  # unix time when this day's aggregates expire
        "stream_maxlen",
        "arm_prefix",  # "experiment|arm|" when an experiment arm routed the job, else ''
        "evaluation_nusd",  # the cost again when it is evaluation spend (shadow grading), else 0
        "is_batch",  # 1 when the job was answered through a provider batch, else 0
        "sync_nusd",  # a batch job's cost at the same model's sync price
    ),
)
FOLD = """
if redis.call('HSETNX', folded_key, record, 1) == 0 then
  return 0
end
redis.call('EXPIREAT', folded_key, folded_expires_at)
local p = field_prefix
redis.call('HINCRBY', day_key, p .. 'jobs', 1)
redis.call('HINCRBY', day_key, p .. 'cost_nusd', cost_nusd)
redis.call('HINCRBY', day_key, p .. 'baseline_nusd', baseline_nusd)
redis.call('HINCRBY', day_key, p .. 'input_tokens', input_tokens)
redis.call('HINCRBY', day_key, p .. 'output_tokens', output_tokens)
redis.call('HINCRBY', day_key, p .. 'cache_hits', cache_hit)
redis.call('HINCRBY', day_key, p .. 'errors', is_error)
if is_batch == '1' then
  redis.call('HINCRBY', day_key, p .. 'batch_jobs', 1)
  redis.call('HINCRBY', day_key, p .. 'batch_cost_nusd', cost_nusd)
  redis.call('HINCRBY', day_key, p .. 'batch_baseline_nusd', baseline_nusd)
  redis.call('HINCRBY', day_key, p .. 'batch_sync_nusd', sync_nusd)
  redis.call('HINCRBY', day_key, p .. 'batch_input_tokens', input_tokens)
  redis.call('HINCRBY', day_key, p .. 'batch_output_tokens', output_tokens)
end
if evaluation_nusd ~= '0' then
  redis.call('HINCRBY', day_key, p .. 'evaluation_nusd', evaluation_nusd)
end
redis.call('EXPIREAT', day_key, day_expires_at)
redis.call('SADD', days_key, day)
redis.call('XADD', stream_key, 'MAXLEN', '~', stream_maxlen, '*', 'entry', entry_json)
if arm_prefix ~= '' then
  local a = arm_prefix
  redis.call('HINCRBY', arms_key, a .. 'jobs', 1)
  redis.call('HINCRBY', arms_key, a .. 'cost_nusd', cost_nusd)
  redis.call('HINCRBY', arms_key, a .. 'baseline_nusd', baseline_nusd)
  redis.call('HINCRBY', arms_key, a .. 'cache_hits', cache_hit)
  redis.call('HINCRBY', arms_key, a .. 'errors', is_error)
  redis.call('EXPIREAT', arms_key, day_expires_at)
end
return 1
"""

# The budgets the job reserved against, in its tenant's slot: release what the reservation key says was
# reserved (the route stage's estimate; nothing when its reserve never landed) and add the actual cost, once (the
# key, marked 'settled', says so). Returns each budget's spend after it. Whatever a caller believes it reserved
# is not trusted: a second copy of the job, which reserved nothing, must not release the first copy's estimate.
SETTLE_LAYOUT = Layout(keys=("reservation_key",), key_tail="budget_keys", args=("cost_nusd", "settled_ttl_s"))
SETTLE = """
local held = redis.call('GET', reservation_key)
local settled = held == 'settled'
local reserved = tonumber(held) or 0
local spent = {}
for _, budget_key in ipairs(budget_keys) do
  if settled then
    spent[#spent + 1] = tonumber(redis.call('HGET', budget_key, 'spent_nusd') or '0')
  else
    if reserved ~= 0 then
      redis.call('HINCRBY', budget_key, 'reserved_nusd', -reserved)
    end
    spent[#spent + 1] = redis.call('HINCRBY', budget_key, 'spent_nusd', cost_nusd)
  end
end
if not settled then
  redis.call('SET', reservation_key, 'settled', 'EX', settled_ttl_s)
end
return spent
"""

# The cache fill and the release of a shared cache entry's lease, in the entry's slot, together: a waiter
# finds the answer the moment the lease is gone (and its waiters are woken: RELEASE).
FILL_LAYOUT = Layout(
    keys=("cache_key", "lease_key", "waiters_key"), args=("cache_value", "cache_ttl_s", "lease_owner", "wake_channel")
)
FILL = (
    """
if cache_value ~= '' then
  redis.call('SET', cache_key, cache_value, 'EX', cache_ttl_s)
end
"""
    + RELEASE
    + """
return 1
"""
)

# On one Redis server (alone, or a Sentinel's master) the record and, when it wrote the entry, all that follows it,
# in one script (Ledger with ``one_server``): RECORD's writes, then FILL's, FOLD's and SETTLE's, atomically. A
# record that finds the job answered or its entry there returns as RECORD does, and the follow-ups go as they do
# on a cluster. The fill's lease is the shared entry's (``fill_*``); RECORD's own lease is the job's.
WHOLE_LAYOUT = Layout(
    keys=(*RECORD_LAYOUT.keys, *FOLD_LAYOUT.keys, "cache_key", "fill_lease_key", "fill_waiters_key", "reservation_key"),
    key_tail="budget_keys",
    args=(
        *RECORD_LAYOUT.args,
        *(name for name in FOLD_LAYOUT.args if name != "entry_json"),  # the fresh entry: RECORD's entry_json
        "cache_value",
        "cache_ttl_s",
        "fill_lease_owner",
        "settled_ttl_s",  # SETTLE's cost_nusd is FOLD's: the fresh entry's cost
    ),
)
WHOLE = (
    """
local function release(lease_key, waiters_key, lease_owner)
"""
    + RELEASE
    + """
end
local function fold()
"""
    + FOLD
    + """
end
local function settle()
"""
    + SETTLE
    + """
end
"""
    + RECORD_HEAD
    + """
release(lease_key, waiters_key, lease_owner)
if fresh == 0 then
  return {existing or false, fresh, entry}
end
if cache_value ~= '' then
  redis.call('SET', cache_key, cache_value, 'EX', cache_ttl_s)
end
release(fill_lease_key, fill_waiters_key, fill_lease_owner)
local spent = {}
if #budget_keys > 0 then
  spent = settle()  -- before the fold: a fold failing on a damaged key must not keep the reservation held
end
fold()
return {false, 1, false, unpack(spent)}
"""
)
