-- wrk script: requests as an HTTP_PROXY client sends them, optional pacing, a JSON summary.
--   BENCH_TARGET    absolute-form target (http://host/path); unset: origin-form (direct)
--   BENCH_HOST      Host header for absolute-form requests
--   BENCH_DELAY_MS  per-connection delay between requests (paced load); 0: saturation

local target = os.getenv("BENCH_TARGET")
local host = os.getenv("BENCH_HOST")
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")

if target and target ~= "" then
  wrk.path = target
  wrk.headers["Host"] = host
end
wrk.headers["Accept"] = "application/json"

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCH_RESULT {"requests":%d,"duration_us":%d,"socket_errors":%d,"status_errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
