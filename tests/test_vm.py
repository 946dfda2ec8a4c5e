"""The root suite for real inside QEMU guests booting Debian's own kernels.

One guest per kernel of tests/vm/run.py's MATRIX, booted once per session, runs
the guest test list once per backend; each (kernel, backend) here reads that
run's junit XML. Slow (TCG): run alone with `make test-vm` or `pytest -m vm`
(docs/vm.md). Needs root, qemu-system-x86, debootstrap and e2fsprogs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

VM_DIR = Path(__file__).resolve().parent / "vm"


def _load_runner():
    spec = importlib.util.spec_from_file_location("acceptrace_vm_run", VM_DIR / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


vmrun = _load_runner()

# ACCEPTRACE_VM_KERNELS="6.1" narrows the matrix (as does -k 6.1-: mind the dash,
# since "6.1" is also a substring of "6.12").
KERNELS = [k for k in vmrun.MATRIX
           if k in (os.environ.get("ACCEPTRACE_VM_KERNELS") or " ".join(vmrun.MATRIX)).split()]
# The whole guest suite's time limit, rootfs build included: a guest gets what is
# left, and is killed when it runs out. A quiet machine needs 34-37 min (both
# guests side by side); the budget leaves room for a busy one (their timeouts
# scale with their calibrated speed) and still ends well before CI's 90 min.
BUDGET = float(os.environ.get("ACCEPTRACE_VM_BUDGET", "4500"))
CELLS = [pytest.param(k, b, id=f"{k}-{b}") for k in KERNELS for b in vmrun.MATRIX[k].backends]


def _asked_for(config: pytest.Config) -> bool:
    """Only when selected on purpose (-m vm, this file, or ACCEPTRACE_VM=1): a
    plain `pytest` as root must not spend twenty minutes in QEMU."""
    if os.environ.get("ACCEPTRACE_VM") == "1":
        return True
    markexpr = config.getoption("markexpr", "") or ""
    if "vm" in markexpr.replace("not vm", ""):
        return True
    return any(Path(str(a).split("::")[0]).name == "test_vm.py" for a in config.args)


@pytest.fixture(scope="session")
def vm_guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """guest(label) -> GuestResult: every selected kernel's guest is booted at once
    (side by side, ACCEPTRACE_VM_PARALLEL at a time); a test waits for its own."""
    if os.geteuid() != 0:
        pytest.skip("needs root: debootstrap and QEMU's 9p shares (sudo make test-vm)")
    if not _asked_for(request.config):
        pytest.skip("QEMU guest suite: run it with -m vm (make test-vm)")
    t0 = time.monotonic()
    missing = vmrun.missing_tools()
    if missing:
        pytest.fail("missing packages " + " ".join(missing) + " (make test-vm installs them)",
                    pytrace=False)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    try:
        with capman.global_and_fixture_disabled():   # a first build takes minutes: show it
            image_dir = vmrun.build_rootfs()
    except vmrun.GuestError as e:
        pytest.fail(str(e), pytrace=False)
    labels = _kernels_wanted(request.session)
    # The guests run side by side: a BCC compile, most of a guest's time, keeps
    # one vCPU busy, so two guests use this 2-core machine about twice as well as
    # one (docs/vm.md). ACCEPTRACE_VM_PARALLEL=1 runs them one after the other.
    parallel = max(1, int(os.environ.get("ACCEPTRACE_VM_PARALLEL") or len(labels) or 1))
    with capman.global_and_fixture_disabled():
        vmrun.OUT = os.fdopen(os.dup(2), "w", buffering=1)   # the terminal, from threads
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="guest")
    left = BUDGET - (time.monotonic() - t0)

    results = {label: tmp_path_factory.mktemp(f"vm-{label}-") for label in labels}

    def boot(label: str):
        plan = vmrun.MATRIX[label]
        timeout = vmrun.guest_timeout([plan.timeout(b) for b in plan.backends], True)
        if left < 120:
            raise vmrun.GuestError(f"not booted: ACCEPTRACE_VM_BUDGET={BUDGET:.0f} s "
                                   "spent before it (the rootfs build)")
        res = vmrun.run_guest(label, checks=True, image_dir=image_dir, echo="progress",
                              results_dir=results[label],
                              timeout=min(timeout, left))
        vmrun.log(vmrun.summary(res))
        return res

    futures = {label: pool.submit(boot, label) for label in labels}

    def guest(label: str, backend: str | None = None):
        """The guest's results; a test fails here when the guest did not finish,
        unless `backend` did finish before that (its results are then judged)."""
        try:
            res = futures[label].result()
        except vmrun.GuestError as e:
            partial = e.result
            if (backend is not None and partial is not None
                    and partial.backends.get(backend) and partial.backends[backend].rc is not None):
                return partial
            pytest.fail(str(e), pytrace=False)
        return res

    yield guest
    vmrun.CANCEL.set()          # guests still running (pytest interrupted): kill them
    pool.shutdown(wait=True)
    vmrun.CANCEL.clear()
    vmrun.OUT.close()
    vmrun.OUT = None


def _kernels_wanted(session: pytest.Session) -> list[str]:
    """The kernels of the vm tests selected in this session, in MATRIX order."""
    wanted = {item.callspec.params["kernel"] for item in session.items
              if isinstance(item, pytest.Function) and hasattr(item, "callspec")
              and "kernel" in item.callspec.params and item.get_closest_marker("vm")}
    return [k for k in KERNELS if k in wanted]


@pytest.mark.parametrize("kernel", [pytest.param(k, id=f"{k}-kernel") for k in KERNELS])
def test_guest_kernel(vm_guest, kernel):
    """The guest booted the intended Debian kernel, with BTF and its own headers,
    and plain BCC programs attach to the hooks the backends use."""
    res = vm_guest(kernel)
    info = res.text("info.txt")
    print(info)
    assert res.release.startswith(kernel + "."), res.release
    assert f" {res.release} " in info, info
    assert "/sys/kernel/btf/vmlinux" in info and "No such file" not in info, info
    assert "headers: /usr/src/linux-headers-" + res.release in info, info
    checks = vmrun.hook_checks(res)
    failed = {h: checks.get(h, (False, "not run"))[1]
              for h in vmrun.MATRIX[kernel].hooks if not checks.get(h, (False,))[0]}
    assert not failed, (f"{res.release}: hooks that do not attach: {failed}\n"
                        + res.text(f"{kernel}-checks.log")[-3000:])


@pytest.mark.parametrize(("kernel", "backend"), CELLS)
def test_guest_suite(vm_guest, kernel, backend):
    """The guest's root tests under one backend: none failed, some passed."""
    res = vm_guest(kernel, backend)
    br = res.backends[backend]
    where = f"{res.release}, backend {backend}"
    skipped = br.by_outcome("skipped")
    for c in skipped:
        print(f"{where}: skipped {c.name}: {c.message}")
    if skipped:
        warnings.warn(f"{where}: {len(skipped)} guest test(s) skipped: "
                      + "; ".join(f"{c.name} ({c.message})" for c in skipped), stacklevel=1)
    bad = br.by_outcome("failed", "error")
    complaints = vmrun.kernel_complaints(res.console) if br.rc == 124 else ""
    timed_out = (f"timed out after {br.timeout} s (time scale {br.scale})"
                 + (f"; the guest kernel said: {complaints}" if complaints else "")
                 + "; the guest's pytest was interrupted, its summary:\n" + vmrun.tail(br.log, 40)
                 if br.rc == 124 else "")
    if bad:
        pytest.fail(f"{where}: {len(bad)} guest test(s) failed (log: {br.log}):\n"
                    + "\n".join(f"- {c.outcome.upper()} {c.name}: "
                                + c.message.replace("\n", "\n    ") for c in bad)
                    + (f"\nand the backend {timed_out}" if timed_out else ""),
                    pytrace=False)
    if timed_out:
        pytest.fail(f"{where}: {timed_out}\n(log: {br.log})", pytrace=False)
    if not br.by_outcome("passed"):
        pytest.fail(f"{where}: no guest test ran (pytest exit {br.rc}; log: {br.log}):\n"
                    + vmrun.tail(br.log, 30), pytrace=False)
    if br.rc != 0:
        pytest.fail(f"{where}: guest pytest exited {br.rc} (log: {br.log}):\n"
                    + vmrun.tail(br.log, 30), pytrace=False)
