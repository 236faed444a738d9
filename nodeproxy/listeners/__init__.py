"""The proxy's listeners inside each enrolled pod's network namespace, one per direction.

outbound.py           15001: the pod's captured connections out: resolve, decide the path,
                      relay or hand to the HTTP proxy
inbound_hbone.py      15008: HBONE CONNECT streams from other nodes' proxies (mutual TLS),
                      admitted and connected transparently to the application
inbound_plaintext.py  15006: plaintext from outside the mesh, steered here by sk_lookup or
                      iptables, admitted (peer authentication) and connected to the application
"""
