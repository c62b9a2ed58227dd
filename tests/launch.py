"""Start ``python -m torch.distributed.run --standalone --nproc_per_node=N`` for a test, in its own
session, so that on a timeout the whole group (torchrun and its ranks) is killed, none left behind."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun(script, *args, nprocs: int = 2, pythonpath: list[str] = (), timeout: float = 120) -> str:
    """Run ``script`` on ``nprocs`` ranks; returns stdout, asserting a zero exit status."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, pythonpath)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}", str(script),
           *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return stdout
