"""Probes a killed BCC process left behind in tracefs, found and removed at start.

BCC attaches most probes through perf events the kernel removes when the process
dies, even by SIGKILL.  Some it must create as named tracefs events instead: a
kretprobe with ``maxactive`` (acceptrace's ``inet_csk_accept`` and
``tcp_recvmsg`` kretprobes: ``r512:kprobes/r_inet_csk_accept_bcc_4242``), and a
uprobe or kprobe wherever the kernel lacks the perf PMU for it
(``p:uprobes/p__usr_lib_..._0x1a2b_bcc_4242``).  BCC removes those in its
cleanup, which a killed process never runs: they stay until reboot, each holding
a probe in the kernel.

Every such event is named ``<name>_bcc_<pid>``.  ``stale_events`` picks those
whose pid no longer runs; ``remove_stale`` deletes them by writing
``-:<group>/<name>`` to the events file (appending: opening it for writing
without O_APPEND would delete every probe of the machine).  An event of a
running process is never touched; and the kernel itself refuses (EBUSY) to
delete an event still attached, e.g. one of a BCC process in another PID
namespace whose pid happens to be free in ours.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EVENT_FILES = ("kprobe_events", "uprobe_events")
# "r512:kprobes/r_inet_csk_accept_bcc_4242 inet_csk_accept"
# "p:uprobes/p__usr_lib_x_so_0x1a2b_bcc_4242 /usr/lib/x.so:0x0000000000001a2b"
_LINE = re.compile(r"^[pr]\d*:(?P<group>[\w.-]+)/(?P<name>[\w.-]+_bcc_(?P<pid>\d+))(?:\s|$)")


@dataclass(frozen=True)
class StaleEvent:
    file: str     # kprobe_events or uprobe_events
    group: str
    name: str
    pid: int

    @property
    def command(self) -> str:
        return f"-:{self.group}/{self.name}"


def pid_alive(pid: int) -> bool:
    """Is a process with this pid running (in our PID namespace)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_events(text: str, file: str) -> list[StaleEvent]:
    """Every BCC-made event (``*_bcc_<pid>``) of one tracefs events file's text."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m is not None:
            out.append(StaleEvent(file, m.group("group"), m.group("name"), int(m.group("pid"))))
    return out


def stale_events(tracefs: str | os.PathLike[str],
                 alive: Callable[[int], bool] = pid_alive) -> list[StaleEvent]:
    """The BCC events in tracefs whose process is gone (never one of ours: we are alive)."""
    out: list[StaleEvent] = []
    for file in EVENT_FILES:
        try:
            text = (Path(tracefs) / file).read_text()
        except OSError:
            continue  # no kprobes (CONFIG_KPROBES off), or no uprobes
        out += [e for e in parse_events(text, file) if e.pid != os.getpid() and not alive(e.pid)]
    return out


def remove_stale(tracefs: str | os.PathLike[str],
                 alive: Callable[[int], bool] = pid_alive) -> tuple[list[StaleEvent], list[str]]:
    """Remove what ``stale_events`` finds; (removed, why others could not be)."""
    removed: list[StaleEvent] = []
    failed: list[str] = []
    for ev in stale_events(tracefs, alive):
        if alive(ev.pid):  # looked again right before: a pid may have come back
            continue
        try:
            fd = os.open(Path(tracefs) / ev.file, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, (ev.command + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:
            failed.append(f"{ev.group}/{ev.name}: {exc.strerror or exc}")
            continue
        removed.append(ev)
    return removed, failed


def describe(removed: list[StaleEvent], failed: list[str]) -> list[str]:
    """What a start says about it (nothing when there was nothing)."""
    lines = []
    if removed:
        pids = sorted({e.pid for e in removed})
        lines.append(f"removed {len(removed)} probe{'s' if len(removed) != 1 else ''} left in "
                     f"tracefs by killed BCC processes (pid{'s' if len(pids) != 1 else ''} "
                     + ", ".join(map(str, pids[:5])) + (", ..." if len(pids) > 5 else "") + ")")
    if failed:
        lines.append(f"could not remove {len(failed)} stale probe"
                     f"{'s' if len(failed) != 1 else ''} ({failed[0]}"
                     + (", ..." if len(failed) > 1 else "") + ")")
    return lines
