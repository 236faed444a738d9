"""HTTP on the wire: messages, their validation, and the HTTP/1.1 and HTTP/2 codecs.

What every HTTP user in the package shares, below the L7 proxy (nodeproxy/http/), the
authorization that judges requests (nodeproxy/policy/) and the HBONE tunnel
(nodeproxy/tunnel/, whose HTTP/2 sessions keep h2_guard's budgets):

message.py   protocol-neutral request/response heads and streamed bodies
request_target.py  the request target validated and normalized once (Istio's
             pathNormalization, Envoy's escaped-slash actions): the one path used
header_fields.py   one value per header name (RFC 9110 lists joined, singletons refused)
h1.py        HTTP/1.1 codec (httptools): downstream server side, upstream client side
h2.py        HTTP/2 codec (h2): downstream server side, upstream client side
h2_guard.py  per-connection HTTP/2 budgets against frame floods (rapid reset, ...)
detect.py    which protocol a new connection speaks (declared, opaque or sniffed)
upgrade.py   whether an Upgrade / CONNECT request becomes a tunnel
"""
