-- wrk script for the benchmark harness (bench/loadgen.py runs it).
-- POSTs the body in the file named by BENCH_BODY_FILE (read as bytes: JSON or binary) to the URL's
-- path, with the headers in BENCH_HEADERS (one "Name: value" a line; default a JSON Content-Type),
-- counts non-2xx responses in every thread, and at the end prints ONE machine-readable line:
-- "BENCH_RESULT {json}". Latencies are in microseconds; socket errors come from wrk's own counters.

local body_file = assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE is not set")
local f = assert(io.open(body_file, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
local header_lines = os.getenv("BENCH_HEADERS") or "Content-Type: application/json"
for line in header_lines:gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.-)%s*$")
  assert(name, "bad header line in BENCH_HEADERS: " .. line)
  wrk.headers[name] = value
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  non2xx = 0
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non2xx") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f,' ..
    '"connect":%.0f,"read":%.0f,"write":%.0f,"timeout":%.0f,"status":%.0f,"non2xx":%.0f}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.timeout, e.status, bad))
end
