-- One principal's limits, checked and charged at once with Redis's own clock (TIME).
--
-- KEYS (hash-tagged by principal, so one slot):
--   1 rpm: GCRA theoretical arrival time (ms, string)     2 tpm: the same, per token
--   3 concurrency: ZSET lease id -> expiry (ms)            4 tokens_per_day: counter, expires at UTC midnight
-- ARGV[1] = op
--   admit   rpm tpm concurrency tokens_per_day cost lease ttl_ms   (a limit of 0: not limited)
--     -> {allowed, denied (1 rpm, 2 tpm, 3 tokens_per_day, 4 concurrency), retry_ms,
--         rpm_remaining, rpm_reset_ms, tpm_remaining, tpm_reset_ms, day_remaining, day_reset_ms,
--         in_flight}; a denied request charges nothing.
--   settle  tpm tokens_per_day delta lease          -> 0   (lease "": none to release)
--   refresh ttl_ms lease...                         -> 0   (re-score live leases)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local PERIOD = 60000
local DAY = 86400000
local EPS = 0.001 -- float slack: `limit` charges of PERIOD/limit must fit in exactly PERIOD
local op = ARGV[1]

local function store_tat(key, tat)
  if tat > now then
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
  else
    redis.call('DEL', key)
  end
end

if op == 'admit' then
  local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
  local conc, day = tonumber(ARGV[4]), tonumber(ARGV[5])
  local cost, lease, ttl = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
  local denied, retry = 0, 0

  -- GCRA with burst = limit: admitted while the arrival time stays within one period ahead.
  -- A cost above the limit is checked as the limit (it goes when the bucket is full) but charged whole.
  local function gcra(key, limit, c, index)
    local interval = PERIOD / limit
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    local check = math.min(c, limit)
    local ahead = tat + check * interval - now
    if ahead > PERIOD + EPS then
      if denied == 0 then denied = index end
      retry = math.max(retry, ahead - PERIOD)
      return tat, math.max(0, math.floor((PERIOD - (tat - now)) / interval + EPS)), tat - now
    end
    local new = tat + c * interval
    return new, math.max(0, math.floor((PERIOD - (new - now)) / interval + EPS)), new - now
  end

  local r_tat, r_rem, r_reset, t_tat, t_rem, t_reset = 0, 0, 0, 0, 0, 0
  if rpm > 0 then r_tat, r_rem, r_reset = gcra(KEYS[1], rpm, 1, 1) end
  if tpm > 0 then t_tat, t_rem, t_reset = gcra(KEYS[2], tpm, cost, 2) end
  local midnight = (math.floor(now / DAY) + 1) * DAY
  local used = 0
  if day > 0 then
    used = tonumber(redis.call('GET', KEYS[4]) or '0')
    if used + math.min(cost, day) > day then
      if denied == 0 then denied = 3 end
      retry = math.max(retry, midnight - now)
    end
  end
  local inflight = 0
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
    inflight = redis.call('ZCARD', KEYS[3])
    if inflight >= conc then
      if denied == 0 then denied = 4 end
      retry = math.max(retry, 1000)
    end
  end
  if denied == 0 then
    if rpm > 0 then store_tat(KEYS[1], r_tat) end
    if tpm > 0 then store_tat(KEYS[2], t_tat) end
    if day > 0 then
      used = redis.call('INCRBY', KEYS[4], cost)
      redis.call('PEXPIREAT', KEYS[4], midnight)
    end
    if conc > 0 then
      redis.call('ZADD', KEYS[3], now + ttl, lease)
      redis.call('PEXPIRE', KEYS[3], ttl * 2)
      inflight = inflight + 1
    end
  end
  local function ms(x) return math.floor(x + 0.5) end
  return {denied == 0 and 1 or 0, denied, math.ceil(retry), r_rem, ms(r_reset), t_rem,
          ms(t_reset), math.max(0, day - used), ms(midnight - now), inflight}
end

if op == 'settle' then
  local tpm, day, delta, lease = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
  if lease ~= '' then redis.call('ZREM', KEYS[3], lease) end
  if delta ~= 0 then
    if tpm > 0 then
      local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
      if tat > 0 then store_tat(KEYS[2], tat + delta * PERIOD / tpm)
      elseif delta > 0 then store_tat(KEYS[2], now + delta * PERIOD / tpm) end
    end
    -- A day that ended meanwhile (key expired) is not charged for the day before.
    if day > 0 and redis.call('EXISTS', KEYS[4]) == 1 then
      if redis.call('INCRBY', KEYS[4], delta) < 0 then redis.call('SET', KEYS[4], 0, 'KEEPTTL') end
    end
  end
  return 0
end

if op == 'refresh' then
  local ttl = tonumber(ARGV[2])
  for i = 3, #ARGV do redis.call('ZADD', KEYS[3], 'XX', now + ttl, ARGV[i]) end
  redis.call('PEXPIRE', KEYS[3], ttl * 2)
  return 0
end

return redis.error_reply('unknown op ' .. tostring(op))
