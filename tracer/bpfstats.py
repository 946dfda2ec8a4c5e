"""The kernel's run-time statistics of acceptrace's own BPF programs.

Owns the two bpf() commands that make tracing's cost a measured figure:
``BPF_ENABLE_STATS`` (Linux 5.8: the kernel times every BPF program while the
returned file descriptor is open, the way bpftop does it) and
``BPF_OBJ_GET_INFO_BY_FD`` (a program's ``run_cnt``, ``run_time_ns`` and
``recursion_misses``: the runs the kernel skipped).  Where struct
bpf_prog_info keeps them comes from BTF (kernel.prog_info_facts), never from a
header.  Called through ctypes' ``syscall()``; no bcc here.

Kernels before 5.8 have no BPF_ENABLE_STATS: the sysctl
``kernel.bpf_stats_enabled`` is set for the run instead and restored on close.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
# acceptrace keeps the statistics on during one interval in this many (--cost-every):
# while on, every run of every BPF program on the host costs more (80 ns here, about
# 2 us per traced connection: bench/stats_cost.py, docs/performance.md).
DEFAULT_EVERY = 10
# __NR_bpf: include/uapi/asm-generic/unistd.h (280) and the architectures' own tables.
NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "loongarch64": 280,
          "s390x": 351, "ppc64le": 361, "ppc64": 361, "i686": 357, "armv7l": 386}


@dataclass(frozen=True)
class ProgStats:
    """One program's counters as the kernel keeps them (cumulative since load)."""

    runs: int              # run_cnt: runs timed while statistics were on
    run_time_ns: int       # their total time
    misses: int | None     # recursion_misses (None: this kernel has no such field)

    def minus(self, other: ProgStats) -> ProgStats:
        m = None if self.misses is None or other.misses is None else self.misses - other.misses
        return ProgStats(self.runs - other.runs, self.run_time_ns - other.run_time_ns, m)

    def plus(self, other: ProgStats) -> ProgStats:
        m = None if self.misses is None or other.misses is None else self.misses + other.misses
        return ProgStats(self.runs + other.runs, self.run_time_ns + other.run_time_ns, m)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf() syscall number unknown on {platform.machine()}")
    ret = _libc().syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr,
                          ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _enable_stats() -> int:
    """BPF_ENABLE_STATS: a descriptor that keeps the run-time statistics on while open."""
    attr = ctypes.create_string_buffer(struct.pack("=I", BPF_STATS_RUN_TIME), 8)
    return _bpf(BPF_ENABLE_STATS, attr)


class StatsSwitch:
    """The kernel's BPF run-time statistics, on for as long as this object is open.

    ``how`` says what turned them on: "BPF_ENABLE_STATS" (a file descriptor: the
    kernel turns them off when it is closed, even if acceptrace is killed),
    "kernel.bpf_stats_enabled" (set to 1 here and restored by close()), "already
    on" (the sysctl was 1 before), or None with ``why``."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.how: str | None = None
        self.why: str | None = None
        self._restore: str | None = None

    @classmethod
    def on(cls) -> StatsSwitch:
        s = cls()
        try:
            s.fd = _enable_stats()
            s.how = "BPF_ENABLE_STATS"
            return s
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                s.why = f"BPF_ENABLE_STATS failed ({exc.strerror})"
                return s
        # before Linux 5.8: the sysctl, for the run
        try:
            s.how = "kernel.bpf_stats_enabled" if s._sysctl_on() else "already on"
        except OSError as exc:
            s.why = f"cannot turn on kernel.bpf_stats_enabled ({exc.strerror})"
        return s

    def _sysctl_on(self) -> bool:
        """Set kernel.bpf_stats_enabled to 1 unless it is already; True if this switch
        did (close() restores it).  OSError if it cannot be read or written."""
        if SYSCTL.read_text().strip() == "1":
            return False
        SYSCTL.write_text("1\n")
        self._restore = "0\n"
        return True

    @property
    def timing(self) -> bool:
        """The kernel times BPF programs now (whoever turned it on)."""
        return self.how == "already on" or self.fd is not None or self._restore is not None

    def pause(self) -> bool:
        """Stop the kernel's timing of BPF programs where this switch turned it on (the
        sysctl is restored, the descriptor closed); returns ``timing`` afterwards: still
        True where another process had it on before us ("already on")."""
        self.close()
        return self.timing

    def resume(self) -> bool:
        """Turn the timing on again the way ``on()`` first did; returns ``timing``."""
        if self.timing or self.how is None:
            return self.timing
        try:
            if self.how == "BPF_ENABLE_STATS":
                self.fd = _enable_stats()
            elif self.how == "kernel.bpf_stats_enabled":
                self._sysctl_on()
        except OSError:
            pass   # not timed: timing says so
        return self.timing

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._restore is not None:
            try:
                SYSCTL.write_text(self._restore)
            finally:
                self._restore = None


def prog_stats(prog_fd: int, layout: dict[str, int]) -> ProgStats:
    """The program's statistics (BPF_OBJ_GET_INFO_BY_FD), ``layout`` being
    kernel.prog_info_facts(); OSError if the kernel refuses."""
    size = layout["size"]
    info = ctypes.create_string_buffer(size)  # zeroed: no pointer asks for more
    attr = ctypes.create_string_buffer(
        struct.pack("=IIQ", prog_fd, size, ctypes.addressof(info)), 16)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    got = struct.unpack_from("=I", attr.raw, 4)[0]   # the kernel's info_len: what it filled

    def u64(field: str) -> int | None:
        off = layout.get(field)
        if off is None or off + 8 > got:
            return None
        return int(struct.unpack_from("=Q", info.raw, off)[0])

    return ProgStats(runs=u64("run_cnt") or 0, run_time_ns=u64("run_time_ns") or 0,
                     misses=u64("recursion_misses"))
