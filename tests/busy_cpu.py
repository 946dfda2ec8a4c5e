"""Test helper: keep one CPU inside a tracepoint BPF program most of the time.

A process pinned to the CPU calls getppid() in a loop; a program on the
syscalls:sys_enter_getppid tracepoint spins for SPIN_NS when that process
is the caller.  While it runs, the kernel's bpf_prog_active is set on that
CPU (trace_call_bpf), so a softirq that interrupts it runs no kprobe or
tracepoint program: the blind spot that acceptrace's extra.softirqs_busy and
extra.packets_unseen count.  (Not a uprobe: since Linux 6.1 uprobe programs
run without bpf_prog_active.)

Tests only: bcc is imported here because this is a load generator for the
test, not part of acceptrace.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import TracebackType
from typing import Any

SPIN_NS = 200_000

SPIN_SRC = r"""
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u64 t0 = bpf_ktime_get_ns();

    if (bpf_get_current_pid_tgid() >> 32 != SPIN_PID)
        return 0;
    for (int i = 0; i < 4000; i++) {
        if (bpf_ktime_get_ns() - t0 > SPIN_NS)
            break;
    }
    return 0;
}
"""

SPINNER = "import os\nwhile True:\n    os.getppid()\n"


class BusyCpu:
    """``with BusyCpu(1):`` -- CPU 1 spends most of its time in a tracepoint program."""

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.bpf: Any = None

    def __enter__(self) -> BusyCpu:
        import bcc  # noqa: PLC0415 - test helper, see the module docstring
        from acceptrace import headers  # the same header tree acceptrace uses

        headers.activate(headers.find_header_tree())
        self.proc = subprocess.Popen([sys.executable, "-c", SPINNER],
                                     preexec_fn=lambda: os.sched_setaffinity(0, {self.cpu}))
        try:
            self.bpf = bcc.BPF(text=SPIN_SRC.encode(), cflags=[f"-DSPIN_NS={SPIN_NS}",
                                                      f"-DSPIN_PID={self.proc.pid}"])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
