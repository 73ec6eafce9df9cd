"""A server started by a study or benchmark (`serve_process`) must not outlive a killed parent: an orphan keeps
its port and gigabytes of memory, and the next run beside it is slowed or killed for memory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

PARENT = """
import subprocess, sys, time
from prefixtune.serve.server import popen_tied_to_parent
start = popen_tied_to_parent if sys.argv[1] == "tied" else subprocess.Popen
child = start([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _child_after_parent_is_killed(mode: str) -> int:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    pid = int(parent.stdout.readline())
    assert _alive(pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    return pid


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_tied_child_dies_when_its_parent_is_killed():
    untied = _child_after_parent_is_killed("plain")  # the control: without the tie the child lives on
    try:
        time.sleep(1)
        assert _alive(untied)
    finally:
        os.kill(untied, signal.SIGKILL)
    tied = _child_after_parent_is_killed("tied")
    deadline = time.monotonic() + 10
    while _alive(tied) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(tied)
