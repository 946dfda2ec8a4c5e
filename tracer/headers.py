"""The kernel header tree BCC compiles against.

BCC needs *a* header tree even though acceptrace takes no struct layout or
enum value from it (those come from BTF): the running kernel's when it is
installed, otherwise any installed Debian/Ubuntu ``linux-headers-*`` pair
merged into one directory (Debian splits the tree into ``-common`` and an
arch half, and BCC wants one), with ``BCC_KERNEL_SOURCE`` pointing at it.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

CACHE_ENV = "ACCEPTRACE_CACHE"
DEFAULT_CACHE = "/var/cache/acceptrace"
SRC_ROOT = Path("/usr/src")


@dataclass
class HeaderTree:
    path: Path | None   # what BCC_KERNEL_SOURCE is set to (None: BCC finds it itself)
    kind: str           # "running", "env", "kheaders" or "merged"
    description: str    # one line for the user / doctor


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def installed_header_pairs(src_root: Path = SRC_ROOT) -> list[tuple[Path, Path | None]]:
    """(arch dir, common dir or None) of installed linux-headers, newest first."""
    pairs: list[tuple[Path, Path | None]] = []
    if not src_root.is_dir():
        return pairs
    for d in src_root.glob("linux-headers-*"):
        if d.name.endswith("-common") or not (d / "include").exists():
            continue
        common: Path | None = None
        m = re.match(r"(linux-headers-\d+\.\d+\.\d+-\d+)-", d.name)
        if m:
            cand = src_root / f"{m.group(1)}-common"
            if cand.is_dir():
                common = cand
        pairs.append((d, common))
    pairs.sort(key=lambda p: _version_key(p[0].name), reverse=True)
    return pairs


def _merge(arch: Path, common: Path | None, dest: Path) -> None:
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # A symlink farm: common first, the arch half over it (cp -as / -asf).
        if common is not None:
            subprocess.run(["cp", "-as", f"{common}/.", f"{tmp}/"], check=True)
        subprocess.run(["cp", "-asf", f"{arch}/.", f"{tmp}/"], check=True)
        (tmp / ".acceptrace-complete").write_text(f"{arch}\n{common}\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    except (OSError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot build a merged kernel header tree in {dest}: {exc}") from exc


def find_header_tree(release: str | None = None, src_root: Path = SRC_ROOT) -> HeaderTree:
    """Choose (and if needed build) the header tree; does not touch the environment."""
    release = release or platform.release()
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        return HeaderTree(Path(env), "env", f"kernel headers: BCC_KERNEL_SOURCE={env}")
    for sub in ("build", "source"):
        p = Path("/lib/modules", release, sub)
        if (p / "include").is_dir():
            return HeaderTree(None, "running", f"kernel headers: {p} (the running kernel's)")
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return HeaderTree(None, "kheaders", "kernel headers: /sys/kernel/kheaders.tar.xz")
    pairs = installed_header_pairs(src_root)
    if not pairs:
        raise UserError(
            f"no kernel header tree: none for {release} and no linux-headers-* in {src_root}; "
            "install one (apt-get install linux-headers-amd64, as `make setup` does)"
        )
    arch, common = pairs[0]
    dest = cache_dir() / "headers" / arch.name
    if not (dest / ".acceptrace-complete").exists():
        _merge(arch, common, dest)
    return HeaderTree(
        dest,
        "merged",
        f"kernel headers: none for {release}; using {arch.name} merged in {dest} "
        "(safe: offsets come from BTF)",
    )


def activate(tree: HeaderTree) -> None:
    """Point BCC at the tree (read by libbcc when it compiles)."""
    if tree.path is not None:
        os.environ["BCC_KERNEL_SOURCE"] = str(tree.path)
