"""L7: the HTTP proxy between a captured client and pooled upstream connections.

The codecs and messages it speaks are nodeproxy/codec/; its series are
nodeproxy/telemetry/request_metrics.py and resilience_metrics.py.

routes.py    compiled HTTPRoute tables: request -> rule -> weighted backend service
balancer.py  per-request endpoint choice (round robin, random, P2C least request,
             P2C peak-EWMA, ring hash)
retry.py     retry conditions, backoff with full jitter, the retry budget
pool.py      upstream connections per endpoint, reused across client connections
circuit_breaker.py  per-service limits: connections, pending, requests, retries (503 UO)
outlier.py   per-endpoint consecutive-error ejection and return
resilience.py  which breaker and detector each cluster uses, across reloads
rate_limit.py  local rate limits per route, destination workload and source identity
fault.py     fault injection: delays and aborts
manager.py   HttpProxy: builds the parts below and hands them each mesh snapshot
client_connections.py  HTTP/1.1 or HTTP/2 server protocol per client connection, its limits
client_h2.py  the HTTP/2 server of a client connection: H2Server plus its header timeout
handler.py   one request: fair share, one meaning, route, rate limit, faults, its record
router.py    one routed request upstream, attempt by attempt
attempts.py  the router's pure decision after each attempt: retry, reply, or respond
clusters.py  upstream clusters: endpoints, budgets, breakers, detectors, pools, /clusters
authorize.py per-request authorization with the destination's policies
local_reply.py  responses the proxy makes itself (HTTP or gRPC form), 429s
upgrade_flow.py  an allowed HTTP/1.1 upgrade carried out, and its L4 flow after the 101
recorder.py  a request's metric, live sample, access-log line and span
context.py   what a request carries: its connection's context, its outcome so far
mirror.py    request mirroring: -shadow copies to shadow services, fire and forget
access_log.py  one JSON line per request, written off the event loop
"""
