"""Whether a process recorded earlier is still the one running, and how a child process ended, in words.

A pid alone is not an identity: once a process ends, the system may give its pid to an unrelated one. A
process is named by its pid and its start time (Linux's /proc/<pid>/stat), and is alive only while both match.
"""

from __future__ import annotations

import os
import signal

LIKELY_CAUSES = {signal.SIGKILL: "often the system ran out of memory", signal.SIGSEGV: "a crash in native code",
                 signal.SIGBUS: "a crash in native code, or a file that shrank while mapped"}


def started(pid: int) -> int | None:
    """When the process `pid` started (clock ticks since boot), or None when there is no such process or no
    /proc to ask."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def identity() -> dict[str, int | None]:
    """This process, as status files record it."""
    return {"pid": os.getpid(), "pid_started": started(os.getpid())}


def still_running(pid: int | None, pid_started: int | None) -> bool:
    """True while the process recorded as (pid, pid_started) runs: same pid, same start time."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return pid_started is None or started(pid) in (None, pid_started)


def how_it_ended(exit_code: int) -> str:
    """An exit code in words: a negative one is the signal that ended the process, named, with its likely cause."""
    if exit_code >= 0:
        return f"exited with code {exit_code}"
    number = -exit_code
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"ended by signal {number}"
    cause = LIKELY_CAUSES.get(number)
    return f"killed by {name} (signal {number}" + (f": {cause})" if cause else ")")
