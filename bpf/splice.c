/* Kernel splice of flows the proxy has decided (sk_skb stream verdict).
 *
 * Once the proxy has admitted a plaintext flow it may hand both of its sockets of that
 * flow (client side and server side) to the kernel: each gets a splice_flows entry
 * naming its peer, goes into np_splice_sockets (this verdict handles its incoming data,
 * and a redirect may deliver to it), and only then gets its splice_control entry.  From
 * then on every segment read from one socket is queued onto the other's send side by the
 * kernel; no byte enters Python.  Until a socket has its control entry (its peer may not
 * be in the sockhash yet) the verdict passes its data to the proxy and counts it, as it
 * does beyond the credit: the proxy forwards those bytes itself, in order, and the
 * verdict redirects only once the proxy has consumed every passed byte.
 *
 * The kernel's redirect has no flow control, and detaching the verdict from a socket
 * that is receiving can drop a segment in flight; so the daemon never detaches a live
 * socket.  It steers with splice_control instead (credit, mode): a segment beyond the
 * credit the daemon granted goes to the socket's own reader (the proxy), which holds
 * it until the kernel's earlier bytes are delivered, then forwards it; meanwhile the
 * passed bytes count against the socket's receive buffer, so TCP's window holds the
 * sender back.  Redirecting resumes once the proxy has consumed every passed byte
 * (ordering).  The sockets leave the maps when they close.
 *
 * The maps are per daemon instance (not pinned): the sockets belong to this process.
 * They are declared in maps.h.
 */

#include "common.h"

int np_splice_verdict(struct __sk_buff *skb)
{
    u64 cookie = np_socket_cookie(skb);
    u32 len = skb->len;
    struct fastpath_counters *c = fastpath_counters();
    struct splice_peer *p = splice_flows.lookup(&cookie);
    struct splice_control *ctl = splice_control.lookup(&cookie);
    /* The segment that carried the FIN reaches the verdict with no data: the FIN is
     * the proxy's to forward, in order; redirected, the peer's send path would fail it
     * (a zero-byte send is a broken pipe to the kernel's sockmap backlog). */
    if (len == 0)
        return SK_DROP;
    if (!p || !ctl || ctl->mode != NP_SPLICE_REDIRECT || ctl->consumed != p->passed ||
        p->moved + len > ctl->credit) {
        if (p)
            __sync_fetch_and_add(&p->passed, len);
        if (c)
            __sync_fetch_and_add(&c->splice_fallback_bytes, len);
        return SK_PASS;  /* to this socket's own reader: the proxy */
    }
    u64 peer = p->peer_cookie;
    __sync_fetch_and_add(&p->moved, len);
    int verdict = np_splice_sockets.sk_redirect_hash(skb, &peer, 0);
    if (c) {
        if (verdict == SK_PASS)
            __sync_fetch_and_add(&c->splice_bytes, len);
        else
            __sync_fetch_and_add(&c->splice_drops, 1);
    }
    return verdict;
}
