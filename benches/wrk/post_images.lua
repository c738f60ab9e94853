-- wrk script: POSTs the JPEGs of $IMAGES_DIR in turn, raw bytes as the body (both servers take that).
-- Each connection starts at its own image, so concurrent requests do not all carry the same picture.
local dir = os.getenv("IMAGES_DIR") or "data/foolbox"
local bodies = {}
local listing = io.popen('ls "' .. dir .. '"')
for name in listing:lines() do
  if name:match("%.jpe?g$") then
    local file = assert(io.open(dir .. "/" .. name, "rb"))
    bodies[#bodies + 1] = file:read("*a")
    file:close()
  end
end
listing:close()
assert(#bodies > 0, "no JPEG in " .. dir)

local next_image = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/jpeg"

request = function()
  next_image = next_image % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[next_image])
end

done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%d seconds=%.3f p50_ms=%.2f p99_ms=%.2f non200=%d errors=%d\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
