"""HBONE: HTTP/2 CONNECT over mutual TLS between nodes, as Istio ambient's ztunnel speaks it.

session.py  one HTTP/2 connection carrying CONNECT streams, each stream a transport
headers.py  the CONNECT request's headers (:authority, Forwarded, the L7-authorized marker)
client.py   pooled connections to other nodes and the streams opened on them
metrics.py  tunnel and identity series
The server side is a listener: nodeproxy/listeners/inbound_hbone.py (15008).
"""
