/* The contract between the eBPF programs and the Python daemon: every map they share
 * (name, kind, key, value, pin) and every struct those maps hold.
 *
 * This header is the single definition on the C side.  Its Python view is
 * nodeproxy/capture/contract.py (ctypes layouts and map specs), used everywhere the
 * daemon names a map; tests/unit/test_kernel_contract.py parses this file and checks
 * every struct's fields, types, offsets and size and every map against that view
 * (no root, no bcc), and the daemon checks the view again against what bcc compiled
 * when it loads the programs.  Numeric constants (ports, map sizes) are passed in by
 * the daemon as -D flags from nodeproxy/capture/constants.py, so they too have one
 * source.
 *
 * Map declarations use bcc's macros in the forms the contract test reads:
 * BPF_TABLE_PINNED, BPF_TABLE, BPF_HASH, BPF_ARRAY, BPF_SOCKHASH, BPF_SK_STORAGE.
 * Pinned maps are pinned as NP_PIN_DIR "/<map name>".
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

/* A probe source prefix (inbound.probeSources) in the LPM trie probe_sources:
 * connections from it are left to the pod (not steered by inbound capture).
 * prefixlen counts the matched bits of family and ip together: 32 + the prefix length. */
struct probe_key {
    u32 prefixlen;
    u32 family;     /* AF_INET or AF_INET6 */
    u32 ip[4];      /* network byte order; IPv4 in ip[0] */
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

/* ---- Maps ---------------------------------------------------------------------------
 * Every map but the per-instance ones and the per-socket storage is pinned under
 * NP_PIN_DIR and shared by the daemon instances of one node: a new instance taking over
 * from an old one (upgrade) finds the same pods, original destinations, counters and
 * rules. */

/* Outbound capture and per-pod counters (bpf/capture.c). */
BPF_TABLE_PINNED("hash", u64, struct pod_info, pods, NP_MAX_PODS, NP_PIN_DIR "/pods");
BPF_TABLE_PINNED("lru_hash", u64, struct orig_dst, origdst_by_cookie, NP_MAX_FLOWS,
                 NP_PIN_DIR "/origdst_by_cookie");
BPF_TABLE_PINNED("lru_hash", struct tuple_key, struct orig_dst, origdst_by_tuple, NP_MAX_FLOWS,
                 NP_PIN_DIR "/origdst_by_tuple");
BPF_TABLE_PINNED("hash", u32, struct pod_counters, pod_stats, NP_MAX_PODS,
                 NP_PIN_DIR "/pod_stats");
BPF_TABLE_PINNED("hash", struct deny_key, u32, connect_denies, NP_MAX_DENIES,
                 NP_PIN_DIR "/connect_denies");
BPF_TABLE_PINNED("array", u32, u64, policy_denials, NP_MAX_POLICIES,
                 NP_PIN_DIR "/policy_denials");
/* Sockets already counted by some instance's sockops (two are attached during a
 * handover): the first to see a socket established counts it. */
BPF_TABLE_PINNED("lru_hash", u64, u32, counted_sockets, NP_MAX_FLOWS,
                 NP_PIN_DIR "/counted_sockets");
BPF_SK_STORAGE(sock_states, struct sock_state);
BPF_TABLE_PINNED("array", u32, struct fastpath_counters, fastpath_stats, 1,
                 NP_PIN_DIR "/fastpath_stats");

/* Inbound capture (bpf/inbound.c).  bcc 0.26 gives BPF_SOCKMAP no lookup(); a BPF_TABLE
 * of type "sockmap" has one, and the verifier accepts the returned socket for
 * bpf_sk_assign.  Slot = pod id * 2 + (IPv6 ? 1 : 0). */
BPF_TABLE_PINNED("sockmap", u32, u32, inbound_listeners, NP_MAX_PODS * 2,
                 NP_PIN_DIR "/inbound_listeners");
BPF_TABLE_PINNED("hash", struct ip_key, u32, inbound_ips, NP_MAX_PODS * 4,
                 NP_PIN_DIR "/inbound_ips");
BPF_TABLE_PINNED("lru_hash", struct dial_key, u32, proxy_dials, NP_MAX_FLOWS,
                 NP_PIN_DIR "/proxy_dials");
/* inbound.probeSources, written by the daemon from the node config (kubelet probes). */
BPF_TABLE_PINNED("lpm_trie", struct probe_key, u32, probe_sources, NP_MAX_PROBE_SOURCES,
                 NP_PIN_DIR "/probe_sources", BPF_F_NO_PREALLOC);

/* Kernel splice (bpf/splice.c): per daemon instance, not pinned (the sockets belong to
 * this process). */
BPF_SOCKHASH(np_splice_sockets, u64, NP_MAX_FLOWS);
BPF_HASH(splice_flows, u64, struct splice_peer, NP_MAX_FLOWS);
BPF_HASH(splice_control, u64, struct splice_control, NP_MAX_FLOWS);

/* The sk_msg fast path (bpf/redirect.c): per daemon instance, not pinned. */
BPF_SOCKHASH(np_msg_sockets, struct msg_key, NP_MAX_FLOWS);
BPF_TABLE("lru_hash", struct msg_key, struct msg_flow, np_msg_flows, NP_MAX_FLOWS);
/* application socket cookie -> bytes the proxy has read from its side (daemon-written) */
BPF_TABLE("lru_hash", u64, u64, np_msg_proxy_read, NP_MAX_FLOWS);
/* [0]: 1 while new connections join the fast path (fastPath.skMsg) */
BPF_ARRAY(np_msg_settings, u32, 1);

#endif
