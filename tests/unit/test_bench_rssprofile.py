"""The RSS profile's reading of /proc/PID/smaps and of sys._debugmallocstats()
(nodeproxy_dev.bench.rssprofile)."""

from __future__ import annotations

from nodeproxy_dev.bench.rssprofile import pymalloc_summary, smaps_groups

SMAPS = """\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234                       /usr/bin/python3.11
Size:               1024 kB
Rss:                 900 kB
55d0c1000000-55d0c2000000 rw-p 00000000 00:00 0                          [heap]
Size:              16384 kB
Rss:               13000 kB
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                4000 kB
7f0000400000-7f0000500000 rw-p 00000000 00:00 0
Rss:                 100 kB
7f1000000000-7f1000100000 r-xp 00000000 08:01 99    /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1200 kB
7f1000100000-7f1000110000 r--p 00100000 08:01 99    /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                  64 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  68 kB
"""


def test_smaps_groups_by_kind_and_library_largest_first() -> None:
    groups = smaps_groups(SMAPS)
    assert groups == {"[heap]": 13000, "anon": 4100, "libc.so.6": 1264, "python3.11": 900,
                      "[stack]": 68}
    assert list(groups)[0] == "[heap]"


PYMALLOC = """\
Small block threshold = 512, in 32 size classes.

class   size   num pools   blocks in use  avail blocks
-----   ----   ---------   -------------  ------------
    0     16           4            1000             24

# arenas allocated total           =                   40
# arenas reclaimed                 =                    2
# arenas highwater mark            =                   38
# arenas allocated current         =                   38
38 arenas * 1048576 bytes/arena    =           39,845,888

# bytes in allocated blocks        =           36,700,000
# bytes in available blocks        =            1,300,000
61 unused pools * 16384 bytes      =              999,424
# bytes lost to pool headers       =              100,000
Total                              =           39,845,888
"""


def test_pymalloc_summary_reads_the_totals() -> None:
    summary = pymalloc_summary(PYMALLOC)
    assert summary["arenas allocated current"] == 38
    assert summary["bytes in allocated blocks"] == 36_700_000
    assert summary["bytes in available blocks"] == 1_300_000
    assert summary["unused pools"] == 61
    assert summary["Total"] == 39_845_888
