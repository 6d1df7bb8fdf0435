-- Turnpike rate limits: decides every limit of one request in one atomic step (the algorithms
-- and their exactness are described in ratelimit.rs; this mirrors local.rs).
--
-- KEYS[i]  the state of limit i, a hash {a, b, c}; a missing key reads as zeros, which every
--          algorithm takes as a fresh key.
-- ARGV     four integers per limit: algorithm (1 fixed window, 2 sliding window, 3 token
--          bucket, 4 leaky bucket), requests, window (us), max delay (us).
-- Reply    four integers per limit: outcome (0 allow, 1 delay, 2 deny), remaining, reset (us),
--          and the wait (delay) or retry-after (deny) in us.
--
-- All or nothing: every limit is decided first, and state is written only if none refused.
-- Lua numbers are doubles, so times are whole microseconds (exact below 2^53, ~285 years of
-- UNIX time) and the emission interval window/requests is kept as whole us plus a remainder
-- in 1/requests us, which keeps the bucket algorithms exact whatever the ratio.

-- TIME is non-deterministic: Redis before 5 refuses writes after it unless the script is
-- replicated by its effects; later versions always do that and keep this as a no-op.
if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

-- The clock is the server's, so every gateway node shares it. Tests may pass a time after
-- the limits' arguments instead, to compare this script with local.rs step by step.
local now = tonumber(ARGV[#KEYS * 4 + 1])
local replay = now ~= nil
if not replay then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local floor, fmod, max = math.floor, math.fmod, math.max

-- tostring() keeps only 14 significant digits; timestamps need 16.
local function int(x)
  return string.format('%.0f', x)
end

-- (whole, fraction) pairs: whole microseconds plus fraction/requests of one.
local function le(aw, ar, bw, br)
  return aw < bw or (aw == bw and ar <= br)
end

local function ceil_us(w, r)
  if r > 0 then
    return w + 1
  end
  return w
end

-- fmod is exact on doubles, where Lua's % (a - floor(a/b)*b) can round.
local function split(t, w)
  local e = fmod(t, w)
  return (t - e) / w, e
end

local function fixed_window(s, n, w)
  local index, elapsed = split(now, w)
  local count = 0
  if s[1] == index then
    count = s[2]
  end
  local reset = w - elapsed
  if count >= n then
    return { 2, 0, reset, reset }
  end
  return { 0, n - count - 1, reset, 0 }, { index, count + 1, 0 }, reset
end

local function sliding_window(s, n, w)
  local index, elapsed = split(now, w)
  local current, previous = 0, 0
  if s[1] == index then
    current, previous = s[2], s[3]
  elseif s[1] == index - 1 then
    previous = s[2]
  end
  local left = w - elapsed
  if previous * left + (current + 1) * w <= n * w then
    current = current + 1
    local remaining = max(floor((n * w - previous * left - current * w) / w), 0)
    return { 0, remaining, left, 0 }, { index, current, previous }, left + w
  end
  local retry
  if current < n then
    retry = w - floor((n - current - 1) * w / previous) - elapsed
  else
    retry = left + w - floor((n - 1) * w / current)
  end
  return { 2, 0, left, max(retry, 1) }
end

local function gcra(s, n, w, leaky, max_delay)
  -- Emission interval T = q + r/n us.
  local r = fmod(w, n)
  local q = (w - r) / n
  -- TAT = max(stored TAT, now)
  local tw, tr = s[1], s[2]
  if not le(now, 0, tw, tr) then
    tw, tr = now, 0
  end
  local nw, nr = tw + q, tr + r
  if nr >= n then
    nw, nr = nw + 1, nr - n
  end

  if not leaky then
    -- Admitted while the new TAT is at most one window ahead.
    local aw = nw - now
    if le(aw, nr, w, 0) then
      local remaining = max(floor(((w - aw) * n - nr) / w), 0)
      local reset = ceil_us(aw, nr)
      return { 0, remaining, reset, 0 }, { nw, nr, 0 }, reset
    end
    return { 2, 0, ceil_us(tw - now, tr), max(ceil_us(nw - w - now, nr), 1) }
  end

  -- Leaky: wait until the slot (the TAT), at most min(max_delay, window - T).
  local cw, cr
  if r > 0 then
    cw, cr = w - q - 1, n - r
  else
    cw, cr = w - q, 0
  end
  if le(max_delay, 0, cw, cr) then
    cw, cr = max_delay, 0
  end
  local ww, wr = tw - now, tr
  if not le(ww, wr, cw, cr) then
    local dw, dr = ww - cw, wr - cr
    if dr < 0 then
      dw, dr = dw - 1, dr + n
    end
    return { 2, 0, ceil_us(ww, wr), max(ceil_us(dw, dr), 1) }
  end
  local aw, ar = nw - now, nr
  local remaining = 0
  if le(aw, ar, cw, cr) then
    remaining = floor(((cw - aw) * n + (cr - ar)) / w) + 1
  end
  local reset = ceil_us(aw, ar)
  local wait = ceil_us(ww, wr)
  local outcome = 0
  if wait > 0 then
    outcome = 1
  end
  return { outcome, remaining, reset, wait }, { nw, nr, 0 }, reset
end

-- States decided so far in this call, so a key that appears twice sees its first use.
local states = {}
local function load(key)
  local s = states[key]
  if s == nil then
    local v = redis.call('HMGET', key, 'a', 'b', 'c')
    s = { tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0 }
  end
  return s
end

local out, writes, refused = {}, {}, false
for i = 1, #KEYS do
  local key = KEYS[i]
  local base = (i - 1) * 4
  local algorithm = tonumber(ARGV[base + 1])
  local n = tonumber(ARGV[base + 2])
  local w = tonumber(ARGV[base + 3])
  local max_delay = tonumber(ARGV[base + 4])
  local decision, state, ttl
  if n <= 0 then
    decision = { 2, 0, w, w }
  else
    local s = load(key)
    if algorithm == 1 then
      decision, state, ttl = fixed_window(s, n, w)
    elseif algorithm == 2 then
      decision, state, ttl = sliding_window(s, n, w)
    elseif algorithm == 3 then
      decision, state, ttl = gcra(s, n, w, false, 0)
    else
      decision, state, ttl = gcra(s, n, w, true, max_delay)
    end
  end
  if state then
    states[key] = state
    writes[#writes + 1] = { key, state, ttl }
  else
    refused = true
  end
  for j = 1, 4 do
    out[#out + 1] = decision[j]
  end
end

if not refused then
  for _, write in ipairs(writes) do
    local key, state, ttl = write[1], write[2], write[3]
    redis.call('HSET', key, 'a', int(state[1]), 'b', int(state[2]), 'c', int(state[3]))
    -- The state equals a fresh key's once ttl has passed, so it can go then. A replayed
    -- clock has nothing to do with the expiry clock: keep those keys a while instead.
    if replay then
      ttl = 600000000
    end
    redis.call('PEXPIRE', key, int(floor(ttl / 1000) + 1))
  end
end
return out
