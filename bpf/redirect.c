/* sk_msg fast path: the two sockets of one captured loopback connection (the
 * application's socket and the proxy's accepted socket, both in the pod's network
 * namespace) hand each other their messages directly, skipping the loopback TCP/IP
 * stack: np_msg_redirect (sk_msg verdict, attached to np_msg_sockets) queues a
 * message onto the peer socket's receive side (BPF_F_INGRESS), where recv() finds it.
 *
 * Who joins np_msg_sockets:
 * - the application socket, from sockops (capture.c) when it is established and its
 *   connect() was captured (msg_join), while np_msg_settings says the fast path is on;
 * - the proxy's socket, from the daemon (nodeproxy/capture/msg_redirect.py) once the
 *   proxy has decided the connection and will relay it itself: a flow the proxy splices
 *   must never receive by redirect, its bytes have to reach the splice verdict.
 * A message whose peer is not in the map takes TCP (a miss).
 *
 * Order.  recv() on a socket in a sockhash reads the redirected queue before the TCP
 * receive queue, so within one direction a redirected message must never follow
 * bytes that took TCP and are still unread.  (The other way round is safe: bytes that
 * take TCP after redirected ones are read after them.)  Hence, per direction:
 * - app -> proxy: after a miss the direction stays on TCP until the proxy has read every
 *   byte the application sent (the daemon posts how much it read in np_msg_proxy_read;
 *   the check runs under the sending socket's lock, so no send races it);
 * - proxy -> app: the application's reads are invisible here, so after a miss that
 *   direction stays on TCP for good.
 *
 * Memory.  A redirect never blocks the sender and the kernel does not bound the
 * receiving side's redirected queue by its receive buffer (only by the global TCP
 * memory limit, then the sender gets ENOMEM).  So each direction has a bound, and a
 * direction over it falls back to TCP, whose flow control then applies:
 * - app -> proxy: at most NP_MSG_TO_PROXY_PENDING bytes sent but not yet read by the
 *   proxy (as last posted);
 * - proxy -> app: at most NP_MSG_TO_APP_BYTES bytes per connection in total.
 *
 * Counting.  Redirected bytes bypass TCP: they are kept per connection in np_msg_flows
 * and added to the pod's byte counters when the application socket closes
 * (msg_settle, from capture.c's close handler); fastpath_stats counts redirected
 * messages, their bytes, and messages of fast-path sockets that took TCP (misses).
 *
 * The maps are this daemon instance's own (not pinned), like the splice's; they are
 * declared in maps.h.
 */

#include "common.h"

/* sock_ops keeps the remote port in network order in its upper 16 bits. */
static __always_inline void msg_key_of(struct bpf_sock_ops *skops, u64 netns,
                                       struct msg_key *key)
{
    key->netns_cookie = netns;
    key->family = skops->family;
    key->local_port = skops->local_port;
    key->remote_port = bpf_ntohl(skops->remote_port);
    if (skops->family == AF_INET) {
        key->local_ip[0] = skops->local_ip4;
        key->remote_ip[0] = skops->remote_ip4;
    } else {
        key->local_ip[0] = skops->local_ip6[0];
        key->local_ip[1] = skops->local_ip6[1];
        key->local_ip[2] = skops->local_ip6[2];
        key->local_ip[3] = skops->local_ip6[3];
        key->remote_ip[0] = skops->remote_ip6[0];
        key->remote_ip[1] = skops->remote_ip6[1];
        key->remote_ip[2] = skops->remote_ip6[2];
        key->remote_ip[3] = skops->remote_ip6[3];
    }
}

/* sockops, ACTIVE_ESTABLISHED of a captured application socket counted by this
 * instance: a fresh flow entry, then the socket joins the sockhash. */
static __always_inline void msg_join(struct bpf_sock_ops *skops, u64 netns, u64 cookie)
{
    u32 zero = 0;
    u32 *on = np_msg_settings.lookup(&zero);
    if (!on || !*on)
        return;
    struct msg_key key = {};
    msg_key_of(skops, netns, &key);
    struct msg_flow flow = {};
    flow.app_cookie = cookie;
    /* A stale entry of an earlier connection with the same addresses is replaced. */
    if (np_msg_flows.update(&key, &flow) != 0)
        return;
    np_msg_proxy_read.delete(&cookie);
    /* bcc rewrites these map methods into statements: assign, never nest them. */
    long err = np_msg_sockets.sock_hash_update(skops, &key, BPF_ANY);
    if (err != 0)
        np_msg_flows.delete(&key);
}

/* sockops, the application socket is closed: add what the redirect moved to the
 * socket's byte counts and forget the flow.  (The sockhash drops the socket itself.) */
static __always_inline void msg_settle(struct bpf_sock_ops *skops, u64 *sent, u64 *received)
{
    struct msg_key key = {};
    msg_key_of(skops, np_netns_cookie(skops), &key);
    struct msg_flow *flow = np_msg_flows.lookup(&key);
    if (!flow || flow->app_cookie != np_socket_cookie(skops))
        return;
    *sent += flow->sent_redirected;
    *received += flow->received_redirected;
    u64 cookie = flow->app_cookie;
    np_msg_proxy_read.delete(&cookie);
    np_msg_flows.delete(&key);
}

/* An application message for the proxy: redirect it, or let it take TCP. */
static __always_inline int msg_to_proxy(struct sk_msg_md *msg, struct msg_flow *flow,
                                        struct msg_key *proxy, u32 size)
{
    u64 cookie = flow->app_cookie;
    u64 *posted = np_msg_proxy_read.lookup(&cookie);
    u64 read = posted ? *posted : 0;
    u64 sent = flow->sent_redirected + flow->sent_tcp;
    if (read > sent)
        goto tcp;  /* not this connection's count: never trust it */
    if (flow->send_on_tcp && read != sent)
        goto tcp;  /* bytes that took TCP may still be unread: a redirect would overtake */
    if (sent - read + size > NP_MSG_TO_PROXY_PENDING)
        goto tcp;  /* the proxy is behind: TCP flow control takes over */
    long verdict = np_msg_sockets.msg_redirect_hash(msg, proxy, BPF_F_INGRESS);
    if (verdict != SK_PASS)
        goto tcp;  /* the proxy's socket is not (or no longer) in the map */
    flow->send_on_tcp = 0;
    flow->sent_redirected += size;
    return 1;
tcp:
    flow->send_on_tcp = 1;
    flow->sent_tcp += size;
    return 0;
}

/* A proxy message for the application: redirect it, or let it take TCP for good. */
static __always_inline int msg_to_app(struct sk_msg_md *msg, struct msg_flow *flow,
                                      struct msg_key *app, u32 size)
{
    if (flow->receive_on_tcp || flow->received_redirected + size > NP_MSG_TO_APP_BYTES)
        goto tcp;
    long verdict = np_msg_sockets.msg_redirect_hash(msg, app, BPF_F_INGRESS);
    if (verdict != SK_PASS)
        goto tcp;  /* the application's socket is gone */
    flow->received_redirected += size;
    return 1;
tcp:
    flow->receive_on_tcp = 1;
    return 0;
}

int np_msg_redirect(struct sk_msg_md *msg)
{
    struct msg_key self = {};
    struct msg_key peer = {};
    u64 netns = np_netns_cookie(msg);
    self.netns_cookie = netns;
    peer.netns_cookie = netns;
    self.family = msg->family;
    peer.family = msg->family;
    self.local_port = msg->local_port;
    peer.remote_port = msg->local_port;
    self.remote_port = bpf_ntohl(msg->remote_port);
    peer.local_port = self.remote_port;
    if (msg->family == AF_INET) {
        self.local_ip[0] = msg->local_ip4;
        self.remote_ip[0] = msg->remote_ip4;
    } else {
        self.local_ip[0] = msg->local_ip6[0];
        self.local_ip[1] = msg->local_ip6[1];
        self.local_ip[2] = msg->local_ip6[2];
        self.local_ip[3] = msg->local_ip6[3];
        self.remote_ip[0] = msg->remote_ip6[0];
        self.remote_ip[1] = msg->remote_ip6[1];
        self.remote_ip[2] = msg->remote_ip6[2];
        self.remote_ip[3] = msg->remote_ip6[3];
    }
    peer.local_ip[0] = self.remote_ip[0];
    peer.local_ip[1] = self.remote_ip[1];
    peer.local_ip[2] = self.remote_ip[2];
    peer.local_ip[3] = self.remote_ip[3];
    peer.remote_ip[0] = self.local_ip[0];
    peer.remote_ip[1] = self.local_ip[1];
    peer.remote_ip[2] = self.local_ip[2];
    peer.remote_ip[3] = self.local_ip[3];

    u32 size = msg->size;
    int redirected = 0;
    /* Only the two kinds of socket are in the map; the proxy's listens on the port. */
    if (self.local_port == NP_OUTBOUND_PORT) {
        struct msg_flow *flow = np_msg_flows.lookup(&peer);
        if (flow)
            redirected = msg_to_app(msg, flow, &peer, size);
    } else {
        struct msg_flow *flow = np_msg_flows.lookup(&self);
        if (flow)
            redirected = msg_to_proxy(msg, flow, &peer, size);
    }
    struct fastpath_counters *c = fastpath_counters();
    if (c) {
        if (redirected) {
            __sync_fetch_and_add(&c->msg_redirects, 1);
            __sync_fetch_and_add(&c->msg_redirect_bytes, size);
        } else {
            __sync_fetch_and_add(&c->msg_misses, 1);
        }
    }
    return SK_PASS;
}
