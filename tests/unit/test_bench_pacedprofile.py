"""pacedprofile's reading of ``strace -f -tt -T``: calls by name and thread, the event
loop's wake-ups that returned no event, and the timeouts it waited with (the events
array holds commas; a call split by another thread's line is counted once, resumed)."""

from __future__ import annotations

from nodeproxy_dev.bench.pacedprofile import read_strace

LOOP = 100
TRACE = """\
100 17:03:09.826641 read(61, "\\27\\3\\3"..., 262144) = 1309 <0.000012>
100 17:03:09.826713 epoll_pwait(3, [{events=EPOLLIN, data={u32=65, u64=65}}, \
{events=EPOLLIN, data={u32=66, u64=66}}], 1024, 230, NULL, 8) = 2 <0.005121>
100 17:03:09.831865 write(65, "GET /small.bin HTTP/1.1\\r\\n"..., 50) = 50 <0.000004>
100 17:03:09.832015 epoll_pwait(3, [], 1024, 0, NULL, 8) = 0 <0.000040>
100 17:03:09.832100 epoll_pwait(3,  <unfinished ...>
101 17:03:09.832200 futex(0x7f, FUTEX_WAKE_PRIVATE, 1) = 0 <0.000010>
100 17:03:09.832500 <... epoll_pwait resumed>[], 1024, 224, NULL, 8) = 0 <0.000400>
100 17:03:09.832600 epoll_pwait(3, [{events=EPOLLIN, data={u32=61, u64=61}}], 1024, -1, \
NULL, 8) = 1 <0.000300>
"""


def test_calls_by_name_and_thread() -> None:
    got = read_strace(TRACE, LOOP)
    assert got["by_name"] == {"read": 1, "epoll_pwait": 4, "write": 1, "futex": 1}
    assert got["by_thread"] == {"100": 6, "101": 1}
    assert got["loop_by_name"] == {"read": 1, "epoll_pwait": 4, "write": 1}


def test_empty_wake_ups_and_timeouts() -> None:
    got = read_strace(TRACE, LOOP)
    assert got["loop_epoll_empty_returns"] == 2  # the poll of 0 ms and the timer's 224 ms
    assert got["loop_epoll_timeouts"] == {"230": 1, "0": 1, "224": 1, "-1 (none)": 1}


def test_other_threads_polls_are_not_the_loops() -> None:
    got = read_strace(TRACE.replace("100 ", "102 "), LOOP)
    assert got["loop_by_name"] == {}
    assert got["loop_epoll_empty_returns"] == 0
