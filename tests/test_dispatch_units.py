"""DispatchTracker without a kernel: one uprobe per parser file, whatever path leads to it."""

from __future__ import annotations

import os

from acceptrace import servers
from acceptrace.dispatch import DispatchTracker, file_key
from acceptrace.servers import DispatchTarget, ServerInfo


class FakeBackend:
    dispatch = True

    def __init__(self) -> None:
        self.dispatch_targets: list[DispatchTarget] = []
        self.pids: list[int] = []

    def attach_dispatch(self, target: DispatchTarget) -> None:
        self.dispatch_targets.append(target)

    def set_server_pids(self, pids: list[int]) -> None:
        self.pids = list(pids)


def test_a_restarted_server_reaching_the_same_file_by_another_path_gets_no_second_uprobe(
        tmp_path, monkeypatch):
    """A server restarted in its own mount namespace maps the same parser.so as
    /proc/<new pid>/root/...: a second uprobe on the same inode would fire twice per
    request (the restart test in test_faults.py counted 2 requests each)."""
    so = tmp_path / "parser.so"
    so.write_bytes(b"\0" * 64)
    other = tmp_path / "root2"
    other.mkdir()
    os.link(so, other / "parser.so")   # another path, the same inode
    paths = {1: str(so), 2: str(other / "parser.so"), 3: str(tmp_path / "gone.so")}
    holders = {frozenset({11}): [1], frozenset({12}): [2], frozenset({13}): [3]}
    monkeypatch.setattr(servers, "pids_with_sockets", lambda inodes: holders[frozenset(inodes)])
    monkeypatch.setattr(servers, "inspect", lambda pid: ServerInfo(
        pid, "uvicorn", "uvicorn", parser="httptools", parser_path=paths[pid]))
    monkeypatch.setattr(servers, "find_dispatch_symbol", lambda path: DispatchTarget(
        path, "cb_on_headers_complete", 0x10, 0x10, True))
    be = FakeBackend()
    tr = DispatchTracker(8000, be)  # type: ignore[arg-type]
    tr.refresh({11})
    tr.refresh({12})      # the first server killed, the second on the same port
    assert [t.path for t in be.dispatch_targets] == [str(so)]
    assert be.pids == [2]
    tr.refresh({13})      # a path that cannot be read: tried by its path
    assert len(be.dispatch_targets) == 2
    assert file_key(paths[1]) == file_key(paths[2]) != file_key(paths[3]) == paths[3]
