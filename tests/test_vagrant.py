"""vagrant/: the lab's VM.  `vagrant validate` (Debian's vagrant and vagrant-libvirt,
which make setup installs) passes for each provider setting; provisioning is the one
script that runs the project's own `make setup`.  Booting it is `make test-lab`'s
(docs/lab.md), not this file's."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT_DIR = Path(__file__).resolve().parent.parent / "vagrant"


def validate(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """vagrant validate on a copy (it writes .vagrant/ beside the Vagrantfile), with the
    repository's place (the synced folder "..") taken by the copy's parent."""
    exe = shutil.which("vagrant")
    if exe is None:
        pytest.fail("vagrant is needed (make setup installs Debian's vagrant and vagrant-libvirt)")
    work = tmp_path / "repo" / "vagrant"
    if not work.exists():
        shutil.copytree(VAGRANT_DIR, work, ignore=shutil.ignore_patterns(".vagrant"))
    full = {**os.environ, "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
            "VAGRANT_CHECKPOINT_DISABLE": "1", **env}
    return subprocess.run([exe, "validate"], cwd=work, env=full, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("env", [{}, {"ACCEPTRACE_LIBVIRT_DRIVER": "kvm"},
                                 {"ACCEPTRACE_BOX": "acceptrace-lab-local",
                                  "ACCEPTRACE_VM_MEMORY": "3072",
                                  "ACCEPTRACE_VM_CONSOLE": "/tmp/console.log"}])
def test_vagrantfile_validates(tmp_path, env):
    res = validate(tmp_path, **env)
    assert res.returncode == 0 and "validated successfully" in res.stdout, \
        res.stdout + res.stderr


def test_vagrantfile_validation_can_fail(tmp_path):
    """The check is real: a broken provider setting is refused."""
    res = validate(tmp_path)
    assert res.returncode == 0
    vf = tmp_path / "repo" / "vagrant" / "Vagrantfile"
    vf.write_text(vf.read_text().replace("lv.cpus = 2", "lv.cpus = 2\n    lv.no_such_option = 1"))
    res = validate(tmp_path)
    assert res.returncode != 0 and "no_such_option" in res.stdout + res.stderr


def test_vagrantfile_settings():
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert 'ENV.fetch("ACCEPTRACE_BOX", "debian/trixie64")' in text
    assert 'config.vm.provider "libvirt"' in text and 'config.vm.provider "virtualbox"' in text
    assert text.count("cpus = 2") == 2
    assert 'ENV.fetch("ACCEPTRACE_LIBVIRT_DRIVER", "qemu")' in text   # TCG unless told
    assert 'synced_folder "..", "/acceptrace"' in text
    assert 'provision "shell", path: "provision.sh"' in text


def test_provisioning_is_make_setup():
    script = VAGRANT_DIR / "provision.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    lines = [ln.strip() for ln in script.read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert "make setup" in lines
    # nothing else installs anything: make (to run make setup) if it is missing
    installs = [ln for ln in lines if "apt-get install" in ln or "pip " in ln]
    assert installs == ["apt-get install -y -qq make"], installs
