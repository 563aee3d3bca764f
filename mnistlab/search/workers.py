"""Which worker trains a trial, and whether it is still alive: a dead worker of this machine is
known at once, without waiting for its heartbeat to go stale.

A trial records the process that trains it (user attribute ``worker``): the host name, the
kernel's boot id, the PID namespace, the PID and the process's start time. A worker that later
finds a RUNNING trial whose process was on this machine (same host, boot and PID namespace) and
is gone (no such PID, or a PID now held by a process that started at another time) fails it at
once, with its reason, and retries it exactly as a stale heartbeat would (``fail_dead_here``).
Trials of other machines, other containers or an earlier boot keep the heartbeat rule: nothing
here can see their processes.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from optuna.trial import TrialState

from mnistlab.core import trials as tr

if TYPE_CHECKING:
    import optuna


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (None where it is gone or unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces
    except IndexError:
        return None


def _machine() -> tuple[str, str, str]:
    """(host, boot id, PID namespace): what makes a PID mean the same process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return socket.gethostname(), boot, namespace


def identity(pid: int | None = None) -> str:
    """This process (or ``pid`` of this machine) as the trial attribute ``worker`` holds it."""
    pid = os.getpid() if pid is None else pid
    return "|".join((*_machine(), str(pid), _start_time(pid) or ""))


def dead_here(worker: str) -> bool:
    """True when ``worker`` (an ``identity``) was a process of this machine that is gone. False
    where that cannot be known: another machine, container or boot, or no /proc to look in."""
    parts = worker.split("|")
    if len(parts) != 5:
        return False
    host, boot, namespace, pid, started = parts
    if (host, boot, namespace) != _machine() or not boot or not namespace or not pid.isdigit() or not started:
        return False
    now = _start_time(int(pid))
    return now is None or now != started


def fail_dead_here(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials of this machine's dead workers, with their reason, and retry each
    as a stale heartbeat would (the storage's callback); returns their numbers."""
    storage = study._storage
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(tr.WORKER)
        if not isinstance(worker, str) or not dead_here(worker):
            continue
        pid = worker.split("|")[3]
        storage.set_trial_user_attr(t._trial_id, tr.REASON, f"its worker (process {pid} on this machine) is gone")
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except Exception:  # another worker failed it first
            continue
        failed.append(t.number)
        callback = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
        if callback is not None:  # it retries the trial (without its reason) and fails its MLflow run
            callback(study, copy.deepcopy(storage.get_trial(t._trial_id)))
    return failed
