/* Inbound capture (sk_lookup, attached to each enrolled pod's network namespace).
 *
 * A TCP connection arriving from outside the pod (any interface but lo) for
 * one of the pod's IPs is handed to the daemon's inbound listener in that
 * pod (inbound_listeners: slot = pod slot * 2 + (IPv6 ? 1 : 0)), so
 * STRICT mTLS and inbound policy hold even against clients outside the mesh.
 * Left alone: the HBONE port (the tunnel's own listener), the inbound port, and
 * the daemon's own transparent connections into the pod, which it announces in
 * proxy_dials (4-tuple) just before connecting: local traffic reports the
 * pod interface as ingress, so no interface test can tell them apart.
 * Also left alone: connections from a probe source (inbound.probeSources, the LPM
 * trie probe_sources), so kubelet's probes reach the application itself, as without
 * a mesh: a tcpSocket probe fails when the application does not listen (steered, the
 * inbound listener would accept it whatever the application does).
 *
 * The maps (inbound_listeners, inbound_ips, proxy_dials, probe_sources) are declared
 * in maps.h.
 */
#include "common.h"

int np_inbound_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    if (ctx->local_port == NP_HBONE_PORT || ctx->local_port == NP_INBOUND_PORT)
        return SK_PASS;
    struct ip_key key = {};
    struct dial_key dial = {};
    struct probe_key probe = {};
    key.family = ctx->family;
    probe.prefixlen = 32 + 128;
    probe.family = ctx->family;
    dial.family = ctx->family;
    dial.remote_port = (u16)ctx->remote_port;
    dial.local_port = ctx->local_port;
    if (ctx->family == AF_INET) {
        key.ip[0] = ctx->local_ip4;
        dial.local_ip[0] = ctx->local_ip4;
        dial.remote_ip[0] = ctx->remote_ip4;
        probe.ip[0] = ctx->remote_ip4;
    } else {
        key.ip[0] = ctx->local_ip6[0];
        key.ip[1] = ctx->local_ip6[1];
        key.ip[2] = ctx->local_ip6[2];
        key.ip[3] = ctx->local_ip6[3];
        dial.local_ip[0] = ctx->local_ip6[0];
        dial.local_ip[1] = ctx->local_ip6[1];
        dial.local_ip[2] = ctx->local_ip6[2];
        dial.local_ip[3] = ctx->local_ip6[3];
        dial.remote_ip[0] = ctx->remote_ip6[0];
        dial.remote_ip[1] = ctx->remote_ip6[1];
        dial.remote_ip[2] = ctx->remote_ip6[2];
        dial.remote_ip[3] = ctx->remote_ip6[3];
        probe.ip[0] = ctx->remote_ip6[0];
        probe.ip[1] = ctx->remote_ip6[1];
        probe.ip[2] = ctx->remote_ip6[2];
        probe.ip[3] = ctx->remote_ip6[3];
    }
    if (proxy_dials.lookup(&dial))
        return SK_PASS;
    u32 *slot = inbound_ips.lookup(&key);
    if (!slot)
        return SK_PASS;
    if (probe_sources.lookup(&probe))
        return SK_PASS;
    u32 index = *slot * 2 + (ctx->family == AF_INET6 ? 1 : 0);
    struct bpf_sock *sk = (struct bpf_sock *)inbound_listeners.lookup(&index);
    if (!sk)
        return SK_PASS;
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err == 0) {
        struct pod_counters *c = counters_of(*slot);  /* capture.c */
        if (c)
            __sync_fetch_and_add(&c->inbound_captured, 1);
    }
    return SK_PASS;
}
