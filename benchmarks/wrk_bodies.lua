-- wrk script for bench_frontend.py's one-core figure: POST each JSON body of a file (one a
-- line) in turn to wrk's URL, stop once LIMIT responses have come back, and print one JSON
-- line of what came back (wrk's own statistics carry no body checks).
--
--   wrk -t1 -c64 -d600s --timeout 60s -s wrk_bodies.lua URL -- BODIES_FILE LIMIT
--
-- An answer counts when it is a 200 whose body has "choices"; its usage's prompt_tokens are
-- summed (both frontends count the same prompt tokens: a check that they did the same work).
-- Run it with one thread (-t1): wrk's main thread waits for -d to pass or for SIGINT, and a
-- thread that stops itself does not end the run, so at LIMIT the thread stops and sends its
-- own process SIGINT.

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local threads = {}

function setup(thread)
   if #threads > 0 then
      error("wrk_bodies.lua: run it with one thread (-t1)")
   end
   table.insert(threads, thread)
end

local bodies, next_body, limit, pid
-- Globals, not locals: done() reads them from the thread with thread:get.
answered, failed, prompt_tokens = 0, 0, 0

function init(args)
   bodies = {}
   for line in io.lines(args[1]) do
      if #line > 0 then
         table.insert(bodies, line)
      end
   end
   if #bodies == 0 then
      error("wrk_bodies.lua: no bodies in " .. tostring(args[1]))
   end
   limit = tonumber(args[2])
   next_body = 0
   -- The process id (wrk's threads share it): /proc/self/stat starts with it.
   local stat = io.open("/proc/self/stat")
   pid = stat:read("*n")
   stat:close()
end

function request()
   next_body = next_body % #bodies + 1
   return wrk.format(nil, nil, nil, bodies[next_body])
end

function response(status, headers, body)
   if status == 200 and body:find('"choices"', 1, true) then
      answered = answered + 1
      local tokens = body:match('"prompt_tokens"%s*:%s*(%d+)')
      if tokens then
         prompt_tokens = prompt_tokens + tonumber(tokens)
      end
   else
      failed = failed + 1
   end
   if answered + failed == limit then
      wrk.thread:stop()
      -- Not os.execute: system(3) ignores SIGINT in this process while its shell runs.
      -- Again every 50 ms for up to 5 s, in the background: a signal that comes before the
      -- main thread went to sleep for -d is lost (it would then sleep the whole -d).
      io.popen(
         "(for i in $(seq 100); do kill -INT " .. pid .. " || exit; sleep 0.05; done)"
            .. " </dev/null >/dev/null 2>&1 &"
      ):close()
   end
end

function done(summary, latency, requests)
   local answered_all, failed_all, tokens_all = 0, 0, 0
   for _, thread in ipairs(threads) do
      answered_all = answered_all + thread:get("answered")
      failed_all = failed_all + thread:get("failed")
      tokens_all = tokens_all + thread:get("prompt_tokens")
   end
   local e = summary.errors
   io.write(string.format(
      '{"wrk": {"answered": %d, "failed": %d, "prompt_tokens": %d, "requests": %d, '
         .. '"duration_us": %d, "p50_us": %d, "p99_us": %d, "socket_errors": %d}}\n',
      answered_all, failed_all, tokens_all, summary.requests, summary.duration,
      latency:percentile(50), latency:percentile(99),
      e.connect + e.read + e.write + e.timeout
   ))
end
