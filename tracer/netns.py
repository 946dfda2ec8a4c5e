"""The network namespace a run traces, and reading the kernel's figures from inside it.

A server in a container has its own network namespace: its listeners, its
``/proc/net/netstat`` counters, its sock_diag view and its ``net.*`` sysctls
are that namespace's, not acceptrace's.  :class:`NetNamespace` names one (its
inode is what the BPF programs compare, ``net->ns.inum``) and runs the
procnet readers inside it: a worker thread that ``setns(CLONE_NEWNET)``-ed
into the namespace and reads ``/proc/thread-self/net/...`` (``/proc/net`` is
the thread group leader's view, not the thread's), opens its sock_diag socket
and its sysctl files there.  acceptrace's own namespace needs no thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import procnet
from .errors import UserError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns add NAME` mounts its namespaces
THREAD_NET = Path("/proc/thread-self/net")
# read_together: the counters a listen drop raises, and how often to try for a quiet moment
STABLE_COUNTERS = ("TcpExtListenOverflows", "TcpExtListenDrops")
STABLE_TRIES = 5


def own_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Worker(threading.Thread):
    """A thread living in another network namespace, running calls handed to it."""

    def __init__(self, path: str) -> None:
        super().__init__(name=f"netns {path}", daemon=True)
        self.path = path
        self.calls: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self.entered: Future[None] = Future()

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.entered.set_exception(exc)
            return
        self.entered.set_result(None)
        while (item := self.calls.get()) is not None:
            fn, fut = item
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                fut.set_exception(exc)


@dataclass
class NetNamespace:
    """One network namespace: its inode, how the user named it, a process in it."""

    inode: int
    label: str                 # "acceptrace's own", "ip netns blue", "pid 4242"
    path: str | None = None    # None: acceptrace's own
    pid: int | None = None
    _worker: _Worker | None = field(default=None, repr=False)

    @classmethod
    def own(cls) -> NetNamespace:
        return cls(inode=own_inode(), label="acceptrace's own")

    @property
    def is_own(self) -> bool:
        return self._worker is None

    def call(self, fn: Callable[[], T]) -> T:
        """fn() inside the namespace."""
        if self._worker is None:
            return fn()
        fut: Future[T] = Future()
        self._worker.calls.put((fn, fut))
        return fut.result(timeout=30)

    # The kernel's figures, from inside the namespace.
    def netstat(self) -> dict[str, int]:
        return self.call(lambda: procnet.net_netstat(
            (THREAD_NET / "netstat", THREAD_NET / "snmp")))

    def read_together(self, port: int | None) -> tuple[dict[int, procnet.ListenerStats],
                                                        dict[str, int]]:
        """The listeners' stats (``listener_drops``) and the namespace's counters
        (``netstat``) as of one moment.  A dropped SYN raises ListenOverflows first and
        the listener's sk_drops a moment later; read across an interval's boundary, the
        two would put it in different intervals and the SYN drops derived from them
        (session._syn_dropped) would lose it.  So the counters are read on both sides
        of the dump, again until no listen drop happened in between."""
        files = (THREAD_NET / "netstat", THREAD_NET / "snmp")

        def read() -> tuple[dict[int, procnet.ListenerStats], dict[str, int]]:
            after = procnet.net_netstat(files)
            for _ in range(STABLE_TRIES):
                before = after
                stats = procnet.listener_drops(port)
                after = procnet.net_netstat(files)
                if all(before.get(k) == after.get(k) for k in STABLE_COUNTERS):
                    break
            return stats, after

        return self.call(read)

    def listening_sockets(self, port: int | None) -> list[procnet.ListenSocket]:
        return self.call(lambda: procnet.listening_sockets(
            port, proc={"ipv4": THREAD_NET / "tcp", "ipv6": THREAD_NET / "tcp6"}))

    def listener_drops(self, port: int | None) -> dict[int, procnet.ListenerStats]:
        return self.call(lambda: procnet.listener_drops(port))

    def somaxconn(self) -> int | None:
        return self.call(procnet.somaxconn)

    def sysctls(self) -> dict[str, int]:
        """The namespace's accept-path sysctls (procnet.ACCEPT_SYSCTLS)."""
        return self.call(procnet.accept_sysctls)

    def describe(self) -> dict[str, object]:
        """For meta.netns: which namespace the figures are from."""
        return {"inode": self.inode, "name": self.label, "pid": self.pid}

    def close(self) -> None:
        if self._worker is not None:
            self._worker.calls.put(None)
            self._worker.join(5)
            self._worker = None


def open_netns(*, pid: int | None = None, path: str | None = None) -> NetNamespace:
    """--pid PID (validated by runner.parse_pid) or --netns NAME|PATH, at most one;
    UserError (one line) if it is not a network namespace that can be entered."""
    if pid is not None and path is not None:
        raise UserError("--pid and --netns both name a network namespace: give one")
    if pid is None and path is None:
        return NetNamespace.own()
    what = f"--pid {pid}" if pid is not None else f"--netns {path}"
    if pid is not None:
        nspath = f"/proc/{pid}/ns/net"
        if not Path(f"/proc/{pid}").is_dir():
            raise UserError(f"--pid {pid}: no such process")
        label = f"pid {pid}"
    else:
        assert path is not None
        nspath = str(NETNS_RUN_DIR / path) if "/" not in path else path
        label = f"ip netns {path}" if "/" not in path else nspath
    try:
        inode = os.stat(nspath).st_ino
    except OSError as exc:
        raise UserError(f"{what}: cannot open {nspath} ({exc.strerror})") from None
    if inode == own_inode():
        return NetNamespace(inode=inode, label=label + " (acceptrace's own)", pid=pid)
    worker = _Worker(nspath)
    worker.start()
    try:
        worker.entered.result(timeout=10)
    except OSError as exc:
        why = "not a network namespace" if exc.errno == 22 else exc.strerror
        raise UserError(f"{what}: cannot enter {nspath} ({why})") from None
    return NetNamespace(inode=inode, label=label, path=nspath, pid=pid, _worker=worker)


def _namespace_paths(proc: Path = Path("/proc")) -> dict[int, tuple[str, str, int | None]]:
    """inode -> (path to open, label, pid) for every network namespace a process or
    `ip netns` holds; `ip netns` names first, else the lowest pid in it."""
    found: dict[int, tuple[str, str, int | None]] = {}
    try:
        named = sorted(NETNS_RUN_DIR.iterdir())
    except OSError:
        named = []
    for p in named:
        try:
            found.setdefault(os.stat(p).st_ino, (str(p), f"ip netns {p.name}", None))
        except OSError:
            continue
    pids = sorted(int(d.name) for d in proc.iterdir() if d.name.isdigit())
    for pid in pids:
        path = proc / str(pid) / "ns" / "net"
        try:
            ino = os.stat(path).st_ino
        except OSError:
            continue  # exited, or a kernel thread
        if ino not in found:
            try:
                comm = (proc / str(pid) / "comm").read_text().strip()
            except OSError:
                comm = "?"
            found[ino] = (str(path), f"pid {pid} ({comm})", pid)
    return found


class NamespaceFinder:
    """--all-namespaces: every network namespace of the host, found again at most
    every ``every_s`` (containers start and stop); each one entered once."""

    def __init__(self, own: NetNamespace, every_s: float = 5.0,
                 clock: Callable[[], float] | None = None) -> None:
        self.clock = clock or time.monotonic
        self.every_s = every_s
        self.own_inode = own.inode
        self.known: set[int] = {own.inode}
        self.opened: list[NetNamespace] = []
        self.gone: list[NetNamespace] = []   # held by nothing but us any more: released
        self._next = 0.0

    def find(self) -> list[NetNamespace]:
        """The namespaces not returned before.  Those that no process and no `ip
        netns` name holds any more (the container stopped) are released -- the
        worker thread inside would keep them alive -- and listed in ``gone``."""
        now = self.clock()
        if now < self._next:
            return []
        self._next = now + self.every_s
        out = []
        paths = _namespace_paths()
        for ns in list(self.opened):
            if ns.inode not in paths:
                self.opened.remove(ns)
                ns.close()
                self.gone.append(ns)
        # Forget namespaces that no longer exist (bounded over weeks of containers; a
        # later namespace that reuses an inode is a new one).
        self.known = {ino for ino in self.known if ino in paths or ino == self.own_inode}
        for ino, (path, label, pid) in paths.items():
            if ino in self.known:
                continue
            try:
                ns = open_netns(path=path)
            except UserError:
                continue  # gone between the scan and the open
            self.known.add(ino)
            if ns.inode != ino:  # a pid reused meanwhile: take it as it is now
                if ns.inode in self.known:
                    ns.close()
                    continue
                self.known.add(ns.inode)
            ns.label, ns.pid = label, pid
            self.opened.append(ns)
            out.append(ns)
        return out

    def take_gone(self) -> list[NetNamespace]:
        out, self.gone = self.gone, []
        return out

    def close(self) -> None:
        for ns in self.opened:
            ns.close()
        self.opened = []
