"""Namespace labels for the exporter (no root): containers from cgroup lines, ip netns
names, the host, the inode; against a fake /proc tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from acceptrace.netns import NetNamespace
from acceptrace.nsname import cgroup_container, container_label, docker_name, namespace_label

ID = "4b825dc642cb6eb9a060e54bf8d69288fbee4904f1b2f3d6c9d8e1a2b3c4d5e6"
UID = "7f5a2c3e-1234-5678-9abc-def012345678"


@pytest.mark.parametrize("text, want", [
    # Docker, cgroup v2 with the systemd driver / v1 with cgroupfs
    (f"0::/system.slice/docker-{ID}.scope\n", ("docker", ID)),
    (f"12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n", ("docker", ID)),
    # Kubernetes: cgroupfs driver (QoS class, guaranteed without one), systemd driver
    (f"0::/kubepods/burstable/pod{UID}/{ID}\n", ("pod", UID)),
    (f"0::/kubepods/pod{UID}/{ID}\n", ("pod", UID)),
    ("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
     f"{UID.replace('-', '_')}.slice/cri-containerd-{ID}.scope\n", ("pod", UID)),
    (f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{ID}.scope\n",
     ("pod", UID)),
    # podman, and another runtime's 64-hex id
    (f"0::/machine.slice/libpod-{ID}.scope/container\n", ("podman", ID)),
    (f"0::/default/{ID}\n", ("container", ID)),
    # the host's processes
    ("0::/\n", None),
    ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
    ("9:name=systemd:/\n4:memory:/process_api/a2fd90b8b3867ab8eb5e02c692918a9f\n0::/\n", None),
])
def test_container_from_cgroup(text, want):
    assert cgroup_container(text) == want


def test_docker_name_from_its_state_file(tmp_path):
    (tmp_path / ID).mkdir()
    (tmp_path / ID / "config.v2.json").write_text(json.dumps({"Name": "/web", "ID": ID}))
    assert docker_name(ID, tmp_path) == "web"
    assert container_label("docker", ID, tmp_path) == "docker:web"
    assert container_label("docker", "0" * 64, tmp_path) == "docker:000000000000"
    assert container_label("pod", UID) == f"pod:{UID}"
    assert container_label("podman", ID) == f"podman:{ID[:12]}"


def fake_proc(root: Path, pids: dict[int, str]) -> dict[int, int]:
    """/proc/PID/{ns/net,cgroup}; each ns/net a file of its own (its inode the namespace's);
    pids sharing a cgroup text share the namespace file.  Returns pid -> inode."""
    by_text: dict[str, Path] = {}
    inodes = {}
    for pid, text in pids.items():
        d = root / str(pid) / "ns"
        d.mkdir(parents=True)
        (root / str(pid) / "cgroup").write_text(text)
        shared = by_text.setdefault(text, root / f"ns-{len(by_text)}")
        shared.touch()
        os.link(shared, d / "net")
        inodes[pid] = os.stat(d / "net").st_ino
    return inodes


def test_namespace_labels(tmp_path):
    proc = tmp_path / "proc"
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    docker = tmp_path / "docker"
    (docker / ID).mkdir(parents=True)
    (docker / ID / "config.v2.json").write_text(json.dumps({"Name": "/web"}))
    ino = fake_proc(proc, {1: "0::/init.scope\n", 40: f"0::/system.slice/docker-{ID}.scope\n",
                           50: f"0::/kubepods/burstable/pod{UID}/{ID}\n",
                           60: "0::/user.slice/session-1.scope\n"})
    blue = netns_dir / "blue"
    os.link(proc / "60" / "ns" / "net", blue)  # `ip netns add blue` holds pid 60's

    def label(inode: int, pid: int | None = None, path: str | None = None) -> str:
        ns = NetNamespace(inode=inode, label="x", path=path, pid=pid)
        ns._worker = object()  # type: ignore[assignment]  # not acceptrace's own
        return namespace_label(ns, proc=proc, run_dir=netns_dir, docker_root=docker)

    assert label(ino[1]) == "host"
    assert label(ino[40], pid=40) == "docker:web"
    assert label(ino[40]) == "docker:web"                           # found by scanning /proc
    assert label(ino[50], path=f"{proc}/50/ns/net") == f"pod:{UID}"
    assert label(ino[60], pid=60) == "netns:blue"                   # the name the user gave
    assert label(123456789) == "inode:123456789"                    # nobody in it
