"""What acceptrace remembers until the next boot: a kernel's answers that cannot
change without a reboot (does it load this program; its BTF-derived facts).

Files in /run/acceptrace (a tmpfs, emptied at boot), named after the boot id.
Only root writes them (the directory is root's, 0700); a file not owned by root,
or writable by anyone else, is ignored. Unwritable or unreadable: nothing is
remembered, and the answer is worked out again.
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path


@functools.cache
def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class BootMemo:
    """One answer, remembered until the next boot."""

    DIR = Path("/run/acceptrace")

    def __init__(self, name: str) -> None:
        bid = boot_id()
        self.path = self.DIR / f"{name}.{bid}" if bid else None

    def get(self) -> str | None:
        if self.path is None:
            return None
        try:
            with open(self.path, encoding="utf-8") as f:
                st = os.fstat(f.fileno())
                if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    return None
                return f.read().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def put(self, answer: str) -> None:
        if self.path is None:
            return
        try:
            self.DIR.mkdir(mode=0o700, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(answer + "\n")
            tmp.replace(self.path)
        except OSError:
            pass

    def forget_others(self, prefix: str) -> None:
        """Remove this boot's other answers named prefix* (older versions' facts)."""
        if self.path is None:
            return
        for p in self.DIR.glob(f"{prefix}*.{boot_id()}"):
            if p != self.path:
                try:
                    p.unlink()
                except OSError:
                    pass
