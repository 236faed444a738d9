"""One TCP connection's machinery, whatever path it came by and whatever it carries.

dial.py        opening sockets as the proxy does: from a pod's netns, marked, transparent
relay.py       bytes both ways between two connections (FIN -> FIN, RST -> RST, backpressure)
splicer.py     handing a decided flow to the kernel (sk_skb splice) and taking it back
send_state.py  what the kernel's TCP state says about a socket's send side
tracker.py     every relayed connection: for drain, and to reset a vanished pod's ones
fairshare.py   each source's share of the proxy: connections, rate, requests, descriptors
descriptors.py the daemon's file descriptors and the share proxied traffic gets
token_bucket.py  the token bucket of every rate limit
"""
