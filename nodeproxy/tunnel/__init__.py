"""HBONE: HTTP/2 CONNECT over mutual TLS between nodes, as Istio ambient's ztunnel speaks it."""
