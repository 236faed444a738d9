"""The profiling tools' start-up hook: a process started within it runs the code with the
variable set; the environment is as before afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nodeproxy_dev.bench.daemon_hook import startup_hook

CODE = "import os\nopen(os.environ['HOOK_OUT'] + '/ran', 'w').write(str(os.getpid()))\n"


def test_a_child_runs_the_hook_and_the_environment_is_restored(tmp_path: Path):
    before = dict(os.environ)
    with startup_hook(tmp_path, CODE, "HOOK_OUT", str(tmp_path)):
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                               capture_output=True, text=True, check=True)
    assert (tmp_path / "ran").read_text() == child.stdout.strip()
    assert dict(os.environ) == before
    (tmp_path / "ran").unlink()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert not (tmp_path / "ran").exists()
