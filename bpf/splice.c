/* Kernel splice of flows the proxy has decided (sk_skb stream verdict).
 *
 * Once the proxy has admitted a plaintext flow it may hand both of its sockets of that
 * flow (client side and server side) to the kernel: each goes into np_splice_targets
 * (a socket a redirect may deliver to) and then np_splice_sockets (a socket whose
 * incoming data this verdict handles), with a splice_flows entry naming its peer.
 * From then on every segment read from one socket is queued straight onto the other's
 * send side by the kernel; no byte enters Python.
 *
 * The two sockhashes are deliberately separate: to take a flow back, the daemon first
 * removes both sockets from np_splice_sockets (the verdict stops; new data stays in
 * the socket's receive queue, in order), waits until the peer's send queue holds every
 * byte already redirected (splice_peer.bytes against the peer's TCP write sequence),
 * and only then removes them from np_splice_targets, which frees the kernel's
 * per-socket state.  A FIN is forwarded by the daemon the same way: after the bytes
 * before it are in the peer's send queue.
 *
 * The maps are per daemon instance (not pinned): the sockets belong to this process.
 */

BPF_SOCKHASH(np_splice_sockets, u64, NP_MAX_FLOWS);
BPF_SOCKHASH(np_splice_targets, u64, NP_MAX_FLOWS);
BPF_HASH(splice_flows, u64, struct splice_peer, NP_MAX_FLOWS);

int np_splice_verdict(struct __sk_buff *skb)
{
    u64 cookie = np_socket_cookie(skb);
    struct fastpath_counters *c = fastpath_counters();
    struct splice_peer *p = splice_flows.lookup(&cookie);
    if (!p) {
        if (c)
            __sync_fetch_and_add(&c->splice_misses, 1);
        return SK_PASS;  /* to this socket's own reader: the proxy */
    }
    u32 len = skb->len;
    /* The segment that carried the FIN reaches the verdict with no data: the FIN is
     * the proxy's to forward, in order; redirected, the peer's send path would fail it
     * (a zero-byte send is a broken pipe to the kernel's sockmap backlog). */
    if (len == 0)
        return SK_DROP;
    u64 peer = p->peer_cookie;
    __sync_fetch_and_add(&p->bytes, len);
    int verdict = np_splice_targets.sk_redirect_hash(skb, &peer, 0);
    if (c) {
        if (verdict == SK_PASS)
            __sync_fetch_and_add(&c->splice_bytes, len);
        else
            __sync_fetch_and_add(&c->splice_drops, 1);
    }
    return verdict;
}
