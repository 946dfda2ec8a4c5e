"""The live dashboard in a real terminal: tmux runs acceptrace, a test server
gets connections, and the captured screen must show them; keys work."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import wait_until

pytestmark = pytest.mark.root


class Tmux:
    def __init__(self, name: str, cmd: list[str], width: int = 100, height: int = 40) -> None:
        if not shutil.which("tmux"):
            pytest.fail("tmux is needed (make setup installs it)")
        self.name = name
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", str(width),
                        "-y", str(height), " ".join(cmd) + "; sleep 30"], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name],
                              capture_output=True, text=True).stdout

    def history(self) -> str:
        """The screen and what scrolled off it."""
        return subprocess.run(["tmux", "capture-pane", "-p", "-S", "-", "-t", self.name],
                              capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def test_dashboard_in_tmux(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    out = tmp_path / "run.json"
    tm = Tmux("acceptrace-test", [sys.executable, "-m", "acceptrace", "--port", str(port),
                                  "--interval", "0.5", "--json", str(out)])
    try:
        assert wait_until(lambda: "conn/s" in tm.screen(), timeout=60), tm.screen()
        screen = tm.screen()
        for needle in ("SYN", "handshake", "accept queue", "accept()", "read", "listen overflows",
                       "h hist", "accepted 0"):
            assert needle in screen, needle
        for _ in range(7):
            c = socket.create_connection(("127.0.0.1", port))
            srv.accept()[0].close()
            c.close()
        assert wait_until(lambda: "accepted 7" in tm.screen(), timeout=10), tm.screen()
        tm.keys("?")
        assert wait_until(lambda: "what the figures mean" in tm.screen(), timeout=5)
        tm.keys("?")
        assert wait_until(lambda: "conn/s" in tm.screen(), timeout=5)
        before = [ln for ln in tm.screen().splitlines() if "histogram" in ln and "range" not in ln]
        tm.keys("h")
        assert wait_until(lambda: [ln for ln in tm.screen().splitlines()
                                   if "histogram" in ln and "range" not in ln] != before,
                          timeout=5), tm.screen()
        tm.keys("q")
        assert wait_until(out.exists, timeout=30), tm.screen()
        time.sleep(0.5)
        # After the dashboard: the final summary is printed to the terminal, the
        # diagnosis last (the top of a summary scrolls off a 40-line screen).
        screen = tm.history()
        assert "report written to" in screen and "slowest connections" in screen, screen
        assert screen.rstrip().splitlines()[-1].startswith("• no accept-path problem"), screen
    finally:
        tm.close()
        srv.close()
    import json

    assert json.loads(out.read_text())["connections"]["accepted"] == 7
