/* Map layouts shared by the eBPF programs and the Python daemon.
 *
 * This header is the single definition: bcc compiles it into the programs
 * and generates the ctypes Key/Leaf classes the daemon uses to read and
 * write the same maps (nodeproxy/capture/maps.py).  Numeric constants
 * (ports, map sizes) are passed in by the daemon as -D flags from
 * nodeproxy/capture/constants.py, so they too have one source.
 */
#ifndef NODEPROXY_MAPS_H
#define NODEPROXY_MAPS_H

/* An enrolled pod, keyed by the cookie of its network namespace. */
struct pod_info {
    u32 pod_id;
    u32 flags;
};

/* Original destination of a captured connect(), network byte order. */
struct orig_dst {
    u32 ip[4];      /* IPv4 in ip[0]; IPv6 in all four words */
    u16 port;       /* network byte order */
    u16 family;     /* AF_INET or AF_INET6 */
    u32 pod_id;
};

/* The application socket's local address, as the proxy sees it as peer. */
struct tuple_key {
    u64 netns_cookie;
    u32 ip[4];      /* network byte order */
    u32 port;       /* host byte order */
    u32 family;
};

/* Per-pod counters kept by the kernel, read by the daemon at scrape time. */
struct pod_counters {
    u64 captured;           /* connect() calls rewritten to the proxy */
    u64 out_opened;         /* active TCP connections established */
    u64 in_opened;          /* passive TCP connections established */
    u64 out_closed;
    u64 in_closed;
    u64 out_bytes_sent;     /* tcp_sock bytes_acked at close */
    u64 out_bytes_received; /* tcp_sock bytes_received at close */
    u64 in_bytes_sent;
    u64 in_bytes_received;
    u64 rtt_sum_us;         /* sum of smoothed RTT samples */
    u64 rtt_samples;
    u64 denied;             /* connect() calls refused with EPERM by policy */
    u64 inbound_captured;   /* connections to the pod steered to its inbound listener */
};

/* An identity-free DENY compiled for the kernel: this pod may not connect here. */
struct deny_key {
    u32 pod_id;
    u32 ip[4];      /* network byte order */
    u16 port;       /* network byte order */
    u16 family;
};

/* A connection the proxy itself is making into a pod (transparent source): inbound
 * capture must let it through to the application.  As sk_lookup sees it. */
struct dial_key {
    u32 remote_ip[4];   /* the client address the proxy binds to; network byte order */
    u32 local_ip[4];    /* the pod address; network byte order */
    u16 remote_port;    /* network byte order */
    u16 family;
    u32 local_port;     /* host byte order */
};

/* A pod IP that inbound capture steers to the pod's inbound listener. */
struct ip_key {
    u32 ip[4];      /* network byte order */
    u32 family;
};

/* Per-socket state, in socket-local storage.  bytes_acked and bytes_received
 * count the SYN and FIN sequence numbers too; the baselines taken at
 * establishment and the FIN flags let the close handler report data only. */
struct sock_state {
    u32 pod_id;
    u32 direction;          /* 1 outbound (active), 2 inbound (passive) */
    u32 flags;              /* NP_SOCK_FIN_SENT | NP_SOCK_FIN_RCVD */
    u32 pad;
    u64 acked_base;
    u64 received_base;
};

/* A spliced flow, as one of its two sockets sees it (bpf/splice.c): keyed by that
 * socket's cookie.  Written by the daemon once, when the flow is spliced; from then on
 * only the verdict changes it (its counters).
 * moved: bytes the verdict redirected from this socket to its peer; the daemon compares
 *   it with the peer's TCP send queue to know when they are all there (before a FIN,
 *   before handing the flow back to the proxy).
 * passed: bytes the verdict left to the proxy instead (paused or taken back). */
struct splice_peer {
    u64 peer_cookie;
    u64 moved;
    u64 passed;
};

/* The daemon's instructions for one spliced socket (keyed by its cookie); the verdict
 * only reads them.  Separate from splice_peer because a map update from user space
 * replaces the whole value, which would lose the verdict's concurrent increments.
 * The verdict redirects a segment only while mode is NP_SPLICE_REDIRECT, consumed ==
 * passed and moved + its length <= credit; otherwise it passes it to the proxy.
 * consumed: bytes of `passed` the proxy has read and put into the peer's send queue,
 *   so bytes left to the proxy are never overtaken by redirected ones;
 * credit: how far `moved` may go: what the peer's send queue has taken plus a window,
 *   so the kernel never queues more than the window for a peer that lags, even when
 *   the daemon is not scheduled for a while (the redirect has no flow control). */
struct splice_control {
    u64 consumed;
    u64 credit;
    u32 mode;       /* NP_SPLICE_REDIRECT or NP_SPLICE_PROXY */
    u32 pad;
};

/* The sk_msg fast path (bpf/redirect.c): one captured loopback connection between an
 * application socket and the proxy's accepted socket, as one of the two sockets sees
 * itself.  The other socket's key is the same with local and remote swapped, so each
 * end finds its peer; the network namespace keeps the pods' identical loopback
 * addresses apart. */
struct msg_key {
    u64 netns_cookie;
    u32 local_ip[4];    /* network byte order; IPv4 in [0] */
    u32 remote_ip[4];
    u32 local_port;     /* host byte order */
    u32 remote_port;    /* host byte order */
    u32 family;
    u32 pad;
};

/* One connection on the sk_msg fast path, keyed by its application socket's msg_key.
 * Redirected bytes bypass TCP, so the application socket's close adds them to the
 * pod's byte counters (tcp_sock counts only what took TCP). */
struct msg_flow {
    u64 app_cookie;           /* the application socket (np_msg_proxy_read's key) */
    u64 sent_redirected;      /* app -> proxy bytes the redirect delivered */
    u64 sent_tcp;             /* app -> proxy bytes that took loopback TCP */
    u64 received_redirected;  /* proxy -> app bytes the redirect delivered */
    u32 send_on_tcp;          /* 1: app -> proxy messages take TCP until the proxy has
                               * read every byte the application sent */
    u32 receive_on_tcp;       /* 1: proxy -> app messages take TCP for good */
};

/* Kernel fast-path counters for the whole node (one slot; bpf/splice.c, bpf/redirect.c). */
struct fastpath_counters {
    u64 splice_bytes;        /* bytes the sk_skb verdict redirected socket to socket */
    u64 splice_fallback_bytes; /* bytes on spliced sockets left to the proxy (paused,
                                * taken back, or no instructions) */
    u64 splice_drops;        /* redirects whose target socket was gone (its flow is ending) */
    u64 msg_redirects;       /* sendmsg() calls the sk_msg program redirected to the peer */
    u64 msg_redirect_bytes;
    u64 msg_misses;          /* sendmsg() calls that fell back to the loopback TCP path */
};

#endif
