"""Ranks die with the processes above them (docs/design.md section 7.7).

A ``--num-procs`` run is a chain: the front (``dora-engine train``), DeepSpeed's runner, its per-node
launcher, the ranks. When a process of the chain is killed outright (``kill -9``, the out-of-memory
killer), nothing below it may train on unsupervised, racing the next run on the same output folder:

- each rank asks the kernel to send it SIGKILL when its parent, the per-node launcher, dies
  (``prctl(PR_SET_PDEATHSIG)``, Linux);
- each rank of a run with a front watches the front's pid (``FRONT_ENV``) and kills itself within
  ``WATCH_INTERVAL_S`` once it is gone; the launcher and the runner then exit, having no rank left.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping

FRONT_ENV = "DORA_ENGINE_FRONT_PID"
WATCH_INTERVAL_S = 0.5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent() -> bool:
    """SIGKILL this process when its parent dies (Linux); returns whether the kernel took the request."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request: nobody will send the signal
        _die()
    return True


def watch_front(environ: Mapping[str, str] | None = None) -> threading.Thread | None:
    """With ``FRONT_ENV`` set (in ``environ``, else ``os.environ``), a daemon thread that kills this process
    once that process has ended."""
    import psutil

    environ = os.environ if environ is None else environ
    try:
        pid = int(environ.get(FRONT_ENV, ""))
    except ValueError:
        return None
    try:
        front = psutil.Process(pid)
    except psutil.NoSuchProcess:  # the front is gone already
        _die()
        return None

    def alive() -> bool:
        try:
            return front.is_running() and front.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(WATCH_INTERVAL_S)
        _die()

    thread = threading.Thread(target=watch, name="dora-engine-front-watch", daemon=True)
    thread.start()
    return thread
