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
manager.py   one client connection's requests: route, authorize, retry, meter, log
mirror.py    request mirroring: -shadow copies to shadow services, fire and forget
access_log.py  one JSON line per request, written off the event loop
"""
