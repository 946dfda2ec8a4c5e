"""Stable, readable names of network namespaces, for the exporter's ``namespace`` label.

A label must name the same thing for as long as it lives and must not grow
with traffic (Prometheus' cardinality rules), so it is never a PID or a client
address.  In this order of preference:

* ``netns:NAME``   -- an ``ip netns`` name (``/run/netns/NAME``): the user named it;
* ``host``         -- the namespace of PID 1 (the host's, seen from acceptrace's PID
                      namespace);
* a container, from the cgroup of a process inside the namespace
  (``/proc/PID/cgroup``):
  ``docker:NAME`` (the container's name from Docker's ``config.v2.json``, else
  ``docker:ID12``), ``pod:UID`` (a Kubernetes pod: its containers share the pod's
  namespace; the UID is kube-state-metrics' ``kube_pod_info{uid}``), ``podman:ID12``,
  ``container:ID12`` (any other 64-hex container id in the path);
* ``inode:N``      -- the namespace's inode (``ip netns identify``, ``lsns -t net``).

:func:`cgroup_container` is pure (unit-tested on real cgroup lines);
:func:`namespace_label` reads ``/proc`` once per namespace (the caller caches it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .netns import NETNS_RUN_DIR, NetNamespace

DOCKER_ROOT = Path("/var/lib/docker/containers")
_HEX64 = r"[0-9a-f]{64}"
# cgroup v2 (systemd driver) and v1 (cgroupfs driver) spellings of each runtime
# a pod UID in a kubepods path: dashes (cgroupfs driver) or underscores (systemd driver)
_POD = re.compile(r"kubepods.*?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}"
                  r"[-_][0-9a-f]{12})")
_DOCKER = re.compile(rf"(?:/docker-({_HEX64})\.scope|/docker/({_HEX64}))(?:/|$)")
_PODMAN = re.compile(rf"/libpod-({_HEX64})\.scope(?:/|$)")
_ANY_ID = re.compile(rf"(?:^|[/-])({_HEX64})(?:\.scope)?(?:/|$)")


def cgroup_container(text: str) -> tuple[str, str] | None:
    """(runtime, id) of the container a ``/proc/PID/cgroup`` text belongs to, or None
    (a process of the host).  runtime: ``pod`` (id: the pod UID), ``docker``,
    ``podman`` or ``container`` (id: the 64-hex container id)."""
    paths = [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]
    for path in paths:
        m = _POD.search(path)
        if m:
            return "pod", m.group(1).replace("_", "-")
    for path in paths:
        m = _DOCKER.search(path)
        if m:
            return "docker", m.group(1) or m.group(2)
        m = _PODMAN.search(path)
        if m:
            return "podman", m.group(1)
    for path in paths:
        m = _ANY_ID.search(path)
        if m:
            return "container", m.group(1)
    return None


def docker_name(cid: str, root: Path = DOCKER_ROOT) -> str | None:
    """The container's name as ``docker ps`` shows it, from Docker's own state file."""
    try:
        name = json.loads((root / cid / "config.v2.json").read_text()).get("Name")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str):
        return None
    return name.lstrip("/") or None


def container_label(runtime: str, cid: str, docker_root: Path = DOCKER_ROOT) -> str:
    if runtime == "pod":
        return f"pod:{cid}"
    if runtime == "docker":
        return f"docker:{docker_name(cid, docker_root) or cid[:12]}"
    return f"{runtime}:{cid[:12]}"


def _inode(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _ip_netns_name(inode: int, run_dir: Path = NETNS_RUN_DIR) -> str | None:
    try:
        names = sorted(run_dir.iterdir())
    except OSError:
        return None
    for p in names:
        if _inode(p) == inode:
            return p.name
    return None


def _pid_in(inode: int, hint: int | None, proc: Path = Path("/proc")) -> int | None:
    """A process inside the namespace: ``hint`` if it still is, else the lowest pid."""
    if hint is not None and _inode(proc / str(hint) / "ns" / "net") == inode:
        return hint
    for d in sorted((d for d in proc.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)):
        if _inode(d / "ns" / "net") == inode:
            return int(d.name)
    return None


def namespace_label(ns: NetNamespace, proc: Path = Path("/proc"),
                    run_dir: Path = NETNS_RUN_DIR, docker_root: Path = DOCKER_ROOT) -> str:
    """The ``namespace`` label of ``ns`` (module docstring)."""
    name = _ip_netns_name(ns.inode, run_dir)
    if name is not None:
        return f"netns:{name}"
    if ns.inode == _inode(proc / "1" / "ns" / "net"):
        return "host"
    hint = ns.pid
    if hint is None and ns.path and ns.path.startswith(f"{proc}/"):
        part = ns.path[len(str(proc)) + 1:].split("/", 1)[0]
        hint = int(part) if part.isdigit() else None
    if hint is None and ns.is_own:
        hint = os.getpid()
    pid = _pid_in(ns.inode, hint, proc)
    if pid is not None:
        try:
            found = cgroup_container((proc / str(pid) / "cgroup").read_text())
        except OSError:
            found = None
        if found is not None:
            return container_label(*found, docker_root=docker_root)
    return f"inode:{ns.inode}"
