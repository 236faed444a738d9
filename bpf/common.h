/* What every source of the one compile unit shares.
 *
 * bcc makes programs only of functions in its main text, so the daemon compiles
 * bpf/capture.c, inbound.c, splice.c and redirect.c concatenated into one text
 * (nodeproxy/capture/programs.py).  Each source includes this header first and uses
 * nothing of another source that is not declared here, so the sources compile in any
 * order (tests/integration/test_bpf_compile.py compiles them in several):
 *
 * - the kernel headers (UAPI only: tests/unit/test_bpf_includes.py says why);
 * - maps.h: every map and every layout the daemon shares;
 * - the helpers bcc 0.26 declares with a 32-bit result, redeclared;
 * - the functions one source defines for the others.
 */
#ifndef NODEPROXY_COMMON_H
#define NODEPROXY_COMMON_H

#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include <linux/in.h>
#include <linux/net.h>  /* SOCK_STREAM; not linux/tcp.h: from 6.10 on it drags in
                          * include/linux/bpf.h, which needs struct bpf_wq that bcc 0.26's
                          * own uapi bpf.h lacks (every program fails to compile) */
#include "maps.h"

/* bcc 0.26 declares these helpers with a 32-bit result; declare them after
 * the maps so map fd relocation is unaffected. */
static u64 (*np_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;
static u64 (*np_netns_cookie)(void *ctx) = (void *)BPF_FUNC_get_netns_cookie;

/* bpf/capture.c */
/* The pod's counters (pod_stats), created zeroed on first use. */
static __always_inline struct pod_counters *counters_of(u32 pod_id);
/* The node's one fastpath_stats slot. */
static __always_inline struct fastpath_counters *fastpath_counters(void);

/* bpf/redirect.c: the sk_msg fast path, joined and settled by sockops (capture.c). */
static __always_inline void msg_join(struct bpf_sock_ops *skops, u64 netns, u64 cookie);
static __always_inline void msg_settle(struct bpf_sock_ops *skops, u64 *sent, u64 *received);

#endif
