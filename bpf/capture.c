/* Outbound capture and per-pod kernel counters.
 *
 * np_connect4 / np_connect6 (cgroup/connect4, cgroup/connect6): for a TCP
 * socket of an enrolled pod, remember the original destination by socket
 * cookie and rewrite the destination to the proxy's outbound listener on
 * loopback inside that pod's network namespace.  Loopback destinations and
 * non-enrolled network namespaces are left alone.  The proxy's own sockets
 * live in the daemon's cgroup, outside the pod subtree these programs are
 * attached to, and additionally carry NP_SOCKET_MARK.
 *
 * np_getpeername4 / np_getpeername6 (cgroup/getpeername*): a captured
 * socket's getpeername() answers the original destination, as it would
 * without the mesh, instead of the proxy's loopback listener.
 *
 * np_sockops (sockops): when a captured socket is established, re-key its
 * original destination by the socket's local address, which is what the
 * proxy sees as the peer of the accepted connection; keep per-pod counters
 * from the kernel's own TCP state (opened, closed, bytes, smoothed RTT).
 *
 * np_original_dst (cgroup/getsockopt, attached to the daemon's own cgroup,
 * since an accepted socket belongs to the cgroup of the process that made its
 * listener): the proxy asks an accepted connection for SO_ORIGINAL_DST, as it
 * would under iptables, and this answers from origdst_by_tuple (the entry is
 * removed once read).  Only the daemon's marked sockets and that one option
 * are answered; every other getsockopt passes through untouched.
 *
 * Captured application sockets also join the sk_msg fast path here (msg_join, and
 * msg_settle at close adds the bytes it moved; both in redirect.c).
 *
 * connect_denies: identity-free DENY rules (ports, ip blocks) compiled by the
 * daemon; a matching connect() fails with EPERM in the source pod, counted
 * per policy and per pod, and never reaches the proxy.
 *
 * The maps are declared in maps.h.  Constants come from nodeproxy/capture/constants.py
 * as -D flags.
 */
#include "common.h"  /* kernel headers, maps.h, what the sources share */

#define NP_SOL_IP 0
#define NP_SOL_IPV6 41
#define NP_SO_ORIGINAL_DST 80  /* SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST alike */
#define NP_DIR_OUT 1
#define NP_DIR_IN 2
#define NP_SOCK_FIN_SENT 1
#define NP_SOCK_FIN_RCVD 2

static __always_inline struct fastpath_counters *fastpath_counters(void)
{
    u32 zero = 0;
    return fastpath_stats.lookup(&zero);
}

static __always_inline struct pod_counters *counters_of(u32 pod_id)
{
    struct pod_counters zero = {};
    pod_stats.insert(&pod_id, &zero);
    return pod_stats.lookup(&pod_id);
}

/* An identity-free DENY for this pod and destination: count it and refuse. */
static __always_inline int denied(struct pod_info *pod, struct deny_key *key)
{
    key->pod_id = pod->pod_id;
    u32 *policy = connect_denies.lookup(key);
    if (!policy)
        return 0;
    u32 index = *policy;
    u64 *count = policy_denials.lookup(&index);
    if (count)
        __sync_fetch_and_add(count, 1);
    struct pod_counters *c = counters_of(pod->pod_id);
    if (c)
        __sync_fetch_and_add(&c->denied, 1);
    return 1;
}

/* The daemon's own sockets carry one of its marks (its outbound dials, its
 * transparent dials into pods, its listeners and what they accept).  They are never
 * captured or counted, also where the daemon's pod shares the pod cgroup subtree. */
static __always_inline int mark_is_ours(u32 mark)
{
    return mark == NP_SOCKET_MARK || mark == NP_TRANSPARENT_MARK;
}

static __always_inline int is_ours(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    return sk && mark_is_ours(sk->mark);
}

int np_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_STREAM || is_ours(ctx))
        return 1;
    u64 netns = np_netns_cookie(ctx);
    struct pod_info *pod = pods.lookup(&netns);
    if (!pod)
        return 1;
    u32 dst = ctx->user_ip4;
    if ((bpf_ntohl(dst) >> 24) == 127)
        return 1;
    struct deny_key dk = {};
    dk.ip[0] = dst;
    dk.port = (u16)ctx->user_port;
    dk.family = AF_INET;
    if (denied(pod, &dk))
        return 0;  /* connect() fails with EPERM */

    struct orig_dst od = {};
    od.ip[0] = dst;
    od.port = (u16)ctx->user_port;
    od.family = AF_INET;
    od.pod_id = pod->pod_id;
    u64 cookie = np_socket_cookie(ctx);
    origdst_by_cookie.update(&cookie, &od);

    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons(NP_OUTBOUND_PORT);
    struct pod_counters *c = counters_of(pod->pod_id);
    if (c)
        __sync_fetch_and_add(&c->captured, 1);
    return 1;
}

int np_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_STREAM || is_ours(ctx))
        return 1;
    u64 netns = np_netns_cookie(ctx);
    struct pod_info *pod = pods.lookup(&netns);
    if (!pod || (pod->flags & NP_POD_NO_IPV6))
        return 1;
    u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
    u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
    /* ::1 */
    if (w0 == 0 && w1 == 0 && w2 == 0 && w3 == bpf_htonl(1))
        return 1;
    /* ::ffff:127.0.0.0/104 (IPv4-mapped loopback) */
    if (w0 == 0 && w1 == 0 && w2 == bpf_htonl(0xffff) && (bpf_ntohl(w3) >> 24) == 127)
        return 1;
    struct deny_key dk = {};
    dk.port = (u16)ctx->user_port;
    if (w0 == 0 && w1 == 0 && w2 == bpf_htonl(0xffff)) {
        /* ::ffff:a.b.c.d is an IPv4 destination: policy is keyed on it as such */
        dk.ip[0] = w3;
        dk.family = AF_INET;
    } else {
        dk.ip[0] = w0;
        dk.ip[1] = w1;
        dk.ip[2] = w2;
        dk.ip[3] = w3;
        dk.family = AF_INET6;
    }
    if (denied(pod, &dk))
        return 0;

    struct orig_dst od = {};
    od.ip[0] = w0;
    od.ip[1] = w1;
    od.ip[2] = w2;
    od.ip[3] = w3;
    od.port = (u16)ctx->user_port;
    od.family = AF_INET6;
    od.pod_id = pod->pod_id;
    u64 cookie = np_socket_cookie(ctx);
    origdst_by_cookie.update(&cookie, &od);

    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = 0;
    ctx->user_ip6[3] = bpf_htonl(1);
    ctx->user_port = bpf_htons(NP_OUTBOUND_PORT);
    struct pod_counters *c = counters_of(pod->pod_id);
    if (c)
        __sync_fetch_and_add(&c->captured, 1);
    return 1;
}

int np_getpeername4(struct bpf_sock_addr *ctx)
{
    u64 cookie = np_socket_cookie(ctx);
    struct orig_dst *od = origdst_by_cookie.lookup(&cookie);
    if (od && od->family == AF_INET) {
        ctx->user_ip4 = od->ip[0];
        ctx->user_port = od->port;
    }
    return 1;
}

int np_getpeername6(struct bpf_sock_addr *ctx)
{
    u64 cookie = np_socket_cookie(ctx);
    struct orig_dst *od = origdst_by_cookie.lookup(&cookie);
    if (od && od->family == AF_INET6) {
        ctx->user_ip6[0] = od->ip[0];
        ctx->user_ip6[1] = od->ip[1];
        ctx->user_ip6[2] = od->ip[2];
        ctx->user_ip6[3] = od->ip[3];
        ctx->user_port = od->port;
    }
    return 1;
}

int np_original_dst(struct bpf_sockopt *ctx)
{
    if (ctx->optname != NP_SO_ORIGINAL_DST)
        return 1;
    if (ctx->level != NP_SOL_IP && ctx->level != NP_SOL_IPV6)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || !mark_is_ours(sk->mark))
        return 1;
    /* The accepted socket's peer is the captured client socket's local address. */
    struct tuple_key key = {};
    key.netns_cookie = np_netns_cookie(ctx);
    key.family = sk->family;
    key.port = bpf_ntohs(sk->dst_port);
    if (sk->family == AF_INET) {
        key.ip[0] = sk->dst_ip4;
    } else {
        key.ip[0] = sk->dst_ip6[0];
        key.ip[1] = sk->dst_ip6[1];
        key.ip[2] = sk->dst_ip6[2];
        key.ip[3] = sk->dst_ip6[3];
    }
    struct orig_dst *found = origdst_by_tuple.lookup(&key);
    if (!found)
        return 1;
    struct orig_dst od = *found;
    __u8 *optval = ctx->optval;
    if (ctx->level == NP_SOL_IP && od.family == AF_INET) {
        /* struct sockaddr_in */
        if (optval + 16 > (__u8 *)ctx->optval_end)
            return 1;
        *(u16 *)optval = AF_INET;
        *(u16 *)(optval + 2) = od.port;
        *(u32 *)(optval + 4) = od.ip[0];
        *(u64 *)(optval + 8) = 0;
        ctx->optlen = 16;
    } else if (ctx->level == NP_SOL_IPV6 && od.family == AF_INET6) {
        /* struct sockaddr_in6 */
        if (optval + 28 > (__u8 *)ctx->optval_end)
            return 1;
        *(u16 *)optval = AF_INET6;
        *(u16 *)(optval + 2) = od.port;
        *(u32 *)(optval + 4) = 0;       /* flow info */
        *(u32 *)(optval + 8) = od.ip[0];
        *(u32 *)(optval + 12) = od.ip[1];
        *(u32 *)(optval + 16) = od.ip[2];
        *(u32 *)(optval + 20) = od.ip[3];
        *(u32 *)(optval + 24) = 0;      /* scope id */
        ctx->optlen = 28;
    } else {
        return 1;
    }
    /* Keeps clang from merging the optlen and retval stores into one 8-byte store,
     * which the verifier refuses. */
    asm volatile("" ::: "memory");
    ctx->retval = 0;
    origdst_by_tuple.delete(&key);
    return 1;
}

/* Returns whether the socket's connect() was captured. */
static __always_inline int remember_tuple(struct bpf_sock_ops *skops, u64 netns)
{
    u64 cookie = np_socket_cookie(skops);
    struct orig_dst *od = origdst_by_cookie.lookup(&cookie);
    if (!od)
        return 0;
    struct tuple_key key = {};
    key.netns_cookie = netns;
    key.family = skops->family;
    key.port = skops->local_port;
    if (skops->family == AF_INET) {
        key.ip[0] = skops->local_ip4;
    } else {
        key.ip[0] = skops->local_ip6[0];
        key.ip[1] = skops->local_ip6[1];
        key.ip[2] = skops->local_ip6[2];
        key.ip[3] = skops->local_ip6[3];
    }
    struct orig_dst copy = *od;
    origdst_by_tuple.update(&key, &copy);
    /* The cookie entry stays for getpeername() until the socket closes. */
    return 1;
}

static __always_inline void on_established(struct bpf_sock_ops *skops, u32 dir)
{
    u64 netns = np_netns_cookie(skops);
    struct pod_info *pod = pods.lookup(&netns);
    if (!pod)
        return;
    u32 pod_id = pod->pod_id;
    int captured = dir == NP_DIR_OUT && remember_tuple(skops, netns);
    struct bpf_sock *sk = skops->sk;
    if (!sk || mark_is_ours(sk->mark))
        return;
    u64 cookie = np_socket_cookie(skops);
    u32 one = 1;
    if (counted_sockets.insert(&cookie, &one) != 0)
        return;  /* another instance's sockops counts this socket */
    struct sock_state *st = sock_states.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!st)
        return;
    st->pod_id = pod_id;
    st->direction = dir;
    st->flags = 0;
    st->acked_base = skops->bytes_acked;        /* the active side's SYN */
    st->received_base = skops->bytes_received;
    struct pod_counters *c = counters_of(pod_id);
    if (c) {
        if (dir == NP_DIR_OUT)
            __sync_fetch_and_add(&c->out_opened, 1);
        else
            __sync_fetch_and_add(&c->in_opened, 1);
    }
    /* Only the instance that counts the socket may redirect its bytes: the redirected
     * ones are added to its counts at close. */
    if (captured)
        msg_join(skops, netns, cookie);
    bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG);
}

static __always_inline struct sock_state *state_of(struct bpf_sock_ops *skops)
{
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return 0;
    return sock_states.sk_storage_get(sk, 0, 0);
}

static __always_inline void on_state(struct bpf_sock_ops *skops)
{
    struct sock_state *st = state_of(skops);
    if (!st || st->direction == 0)
        return;
    u32 new = skops->args[1];
    switch (new) {
    case BPF_TCP_LAST_ACK:
        st->flags |= NP_SOCK_FIN_SENT;
        break;
    case BPF_TCP_CLOSE_WAIT:
    case BPF_TCP_CLOSING:
        st->flags |= NP_SOCK_FIN_RCVD;
        break;
    case BPF_TCP_FIN_WAIT1:
        st->flags |= NP_SOCK_FIN_SENT;
        /* The peer's FIN can arrive in FIN_WAIT1/2 without a state change we
         * see (the socket becomes a timewait socket): watch incoming headers
         * from here on; only this phase pays a callback per packet. */
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
                                  BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG);
        break;
    }
    if (new != BPF_TCP_CLOSE)
        return;
    struct pod_counters *c = counters_of(st->pod_id);
    if (c) {
        u64 sent = skops->bytes_acked - st->acked_base;
        u64 received = skops->bytes_received - st->received_base;
        if ((st->flags & NP_SOCK_FIN_SENT) && skops->snd_una == skops->snd_nxt && sent > 0)
            sent -= 1;
        if ((st->flags & NP_SOCK_FIN_RCVD) && received > 0)
            received -= 1;
        if (st->direction == NP_DIR_OUT) {
            msg_settle(skops, &sent, &received);  /* bytes that bypassed TCP */
            __sync_fetch_and_add(&c->out_closed, 1);
            __sync_fetch_and_add(&c->out_bytes_sent, sent);
            __sync_fetch_and_add(&c->out_bytes_received, received);
        } else {
            __sync_fetch_and_add(&c->in_closed, 1);
            __sync_fetch_and_add(&c->in_bytes_sent, sent);
            __sync_fetch_and_add(&c->in_bytes_received, received);
        }
    }
    st->direction = 0;  /* count each socket's close once */
    u64 cookie = np_socket_cookie(skops);
    origdst_by_cookie.delete(&cookie);
    counted_sockets.delete(&cookie);
}

static __always_inline void on_header(struct bpf_sock_ops *skops)
{
    if (!(skops->skb_tcp_flags & 0x01))  /* TCPHDR_FIN */
        return;
    struct sock_state *st = state_of(skops);
    if (st && st->direction != 0)
        st->flags |= NP_SOCK_FIN_RCVD;
}

static __always_inline void on_rtt(struct bpf_sock_ops *skops)
{
    struct sock_state *st = state_of(skops);
    if (!st || st->direction == 0)
        return;
    struct pod_counters *c = counters_of(st->pod_id);
    if (c) {
        __sync_fetch_and_add(&c->rtt_sum_us, skops->srtt_us >> 3);
        __sync_fetch_and_add(&c->rtt_samples, 1);
    }
}

int np_sockops(struct bpf_sock_ops *skops)
{
    switch (skops->op) {
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        on_established(skops, NP_DIR_OUT);
        break;
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        on_established(skops, NP_DIR_IN);
        break;
    case BPF_SOCK_OPS_STATE_CB:
        on_state(skops);
        break;
    case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
        on_header(skops);
        break;
    case BPF_SOCK_OPS_RTT_CB:
        on_rtt(skops);
        break;
    }
    return 1;
}
