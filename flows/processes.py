"""Child processes that never outlive the run that started them.

Prefect does not stop a flow run's child processes when the run is cancelled or killed (its own
ephemeral API server included, which is orphaned by a SIGKILL). Everything we start goes into its
own process group, gets SIGTERM/SIGINT forwarded, and asks the kernel to kill it if its parent dies
(PR_SET_PDEATHSIG), so even `kill -9` of `family run` leaves nothing behind.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for children: own process group, SIGKILL when the parent dies."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the process group still lets us stop it on exit
        pass


def free_port(preferred: int = 0) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise OSError("no free port on 127.0.0.1")


def stop_group(proc, timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except Exception:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
