-- Session pins and automation settings, with Redis's clock (TIME). Times are epoch ms.
--
-- A pin is a hash {backend, route, created, last, n} with a sliding TTL; settings are a JSON
-- string. Both keys of a user share one hash tag (one slot).
-- ARGV[1] = op
--   touch default_ttl_ms fixed   KEYS: settings [, pin]
--     -> {settings|nil, backend, route, created, last, n, expires}   (pin fields nil: no pin)
--     one more request on the pin, last use = now, TTL = settings.session_ttl_s or the default
--     (always the default when fixed is '1': a response's pin, or a TTL the caller chose).
--   read   KEYS: settings [, pin]   -> the same, untouched: asked with a limits admission that
--     may refuse the request; an admitted one is counted by a `touch` (or `claim ... 1`) after.
--   claim backend route ttl_ms replaces count   KEYS: pin
--     pins only if there is no pin (replaces '') or it still names `replaces`
--     -> {backend, route, created, last, n, expires}: the pin that holds now
--     count '1': this request is one more on that pin (ours or the winner's), last use = now
--   get   KEYS: pin   -> the same, untouched (nil fields: no pin)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]

local function pin(key)
  local f = redis.call('HMGET', key, 'backend', 'route', 'created', 'last', 'n')
  if not f[1] then return {false, false, false, false, false, false} end
  return {f[1], f[2], f[3], f[4], f[5], now + redis.call('PTTL', key)}
end

if op == 'touch' then
  local settings = redis.call('GET', KEYS[1])
  if #KEYS < 2 or redis.call('EXISTS', KEYS[2]) == 0 then
    return {settings, false, false, false, false, false, false}
  end
  local ttl = tonumber(ARGV[2])
  if settings and ARGV[3] ~= '1' then
    local ok, doc = pcall(cjson.decode, settings)
    if ok and type(doc) == 'table' and tonumber(doc['session_ttl_s']) then
      ttl = tonumber(doc['session_ttl_s']) * 1000
    end
  end
  redis.call('HINCRBY', KEYS[2], 'n', 1)
  redis.call('HSET', KEYS[2], 'last', now)
  redis.call('PEXPIRE', KEYS[2], ttl)
  local p = pin(KEYS[2])
  return {settings, p[1], p[2], p[3], p[4], p[5], p[6]}
end

if op == 'read' then
  local settings = redis.call('GET', KEYS[1])
  if #KEYS < 2 then return {settings, false, false, false, false, false, false} end
  local p = pin(KEYS[2])
  return {settings, p[1], p[2], p[3], p[4], p[5], p[6]}
end

if op == 'claim' then
  local backend, route, ttl, replaces = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
  local count = ARGV[6] == '1'
  local current = redis.call('HGET', KEYS[1], 'backend')
  if current and (replaces == '' or current ~= replaces) then
    if count then  -- another request pinned it first: this one goes there too
      redis.call('HINCRBY', KEYS[1], 'n', 1)
      redis.call('HSET', KEYS[1], 'last', now)
      redis.call('PEXPIRE', KEYS[1], ttl)
    end
    return pin(KEYS[1])
  end
  if current then
    redis.call('HSET', KEYS[1], 'backend', backend, 'route', route, 'last', now)
    if count then redis.call('HINCRBY', KEYS[1], 'n', 1) end
  else
    redis.call('HSET', KEYS[1], 'backend', backend, 'route', route, 'created', now,
               'last', now, 'n', 1)
  end
  redis.call('PEXPIRE', KEYS[1], ttl)
  return pin(KEYS[1])
end

if op == 'get' then
  return pin(KEYS[1])
end

return redis.error_reply('unknown op ' .. tostring(op))
