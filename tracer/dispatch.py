"""Dispatch tracking: which processes serve the traced port, and the uprobes on their parser.

Owns DispatchTracker, which the session asks once an interval to keep the
kernel's server-pid filter and the httptools uprobes current.  Pure Python
over servers.py (/proc) and the Backend protocol.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from . import servers
from .backend import Backend


class DispatchTracker:
    """Keeps the dispatch uprobes and the kernel's server-pid filter current.

    Rescans the processes holding the port's listening socket (workers that
    restart, --reload, a server that starts late), attaches a uprobe for each
    httptools module they map, and says once why dispatch cannot be traced.
    """

    FULL_SCAN_S = 10.0

    def __init__(self, port: int, backend: Backend,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.port = port
        self.backend = backend
        self.clock = clock
        self.pids: list[int] = []
        self._inodes: set[int] = set()
        self._next_full = 0.0
        self.infos: dict[int, servers.ServerInfo] = {}
        # the parser files tried, by identity: a uprobe is on an inode, whatever path
        # reaches it (a server restarted in its own mount namespace maps the same file
        # as /proc/<new pid>/root/...: a second uprobe there counted each request twice)
        self.tried: set[tuple[int, int] | str] = set()
        self.messages: list[str] = []
        self._said: set[str] = set()

    @property
    def available(self) -> bool:
        return bool(self.backend.dispatch_targets)

    def _say(self, key: str, msg: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.messages.append(msg)

    def refresh(self, inodes: set[int]) -> None:
        """Rescan the processes holding ``inodes`` (the port's listening sockets).

        Walking every /proc/PID/fd is the costly part: it is done when the set
        of listening sockets changes (a server started or restarted), and every
        FULL_SCAN_S for workers that replace each other on the same socket;
        in between, processes that exited are dropped.
        """
        now = self.clock()
        if inodes != self._inodes or now >= self._next_full:
            self._inodes = set(inodes)
            self._next_full = now + self.FULL_SCAN_S
            pids = servers.pids_with_sockets(self._inodes)
        else:
            pids = [p for p in self.pids if servers.alive(p)]
        if pids != self.pids:
            self.backend.set_server_pids(pids)
            self.pids = pids
            # workers that exited are forgotten (a run of weeks sees many come and go)
            self.infos = {p: i for p, i in self.infos.items() if p in pids}
        for pid in pids:
            if pid in self.infos:
                continue
            info = self.infos[pid] = servers.inspect(pid)
            if info.parser_path and file_key(info.parser_path) not in self.tried:
                self.tried.add(file_key(info.parser_path))
                target = servers.find_dispatch_symbol(info.parser_path)
                if target is None:
                    self._say(info.parser_path, "dispatch: not available — no usable symbol in "
                              f"{info.parser_path} (stripped?)")
                    continue
                self.backend.attach_dispatch(target)
                if not target.exact:
                    self._say(info.parser_path, "dispatch: httptools is stripped; timing "
                              "llhttp_execute instead (parse start, see docs/dispatch.md)")
            elif info.parser == "h11":
                self._say("h11", "dispatch: not available — server uses h11; "
                          "run uvicorn with --http httptools")
            elif info.parser is None:
                self._say(f"noparser-{info.comm}",
                          f"dispatch: not available — {info.comm} (pid {pid}) maps no httptools "
                          "parser (not uvicorn with httptools)")

    def take_messages(self) -> list[str]:
        out, self.messages = self.messages, []
        return out


def file_key(path: str) -> tuple[int, int] | str:
    """A file's identity (device, inode); its path when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return path
    return (st.st_dev, st.st_ino)
