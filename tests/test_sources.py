"""Every backend's source compiles under every combination of what a kernel may lack.

A body that uses a define only some kernels get (a drop-reason enum, IPv6
offsets, the blind-spot symbols) must sit under its own row's or flag's #if;
otherwise the backend fails to compile on exactly those kernels, which the
host alone never shows.  This compiles each plan with BCC on this machine:
the tracepoint and kprobe sources load too (kprobe functions are only
verified, never attached); the fentry source must compile, and may then be
refused at load by this kernel.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
BUSY = {"AT_KSYM_PER_CPU_OFFSET": 0xFFFFFFFF82A0B000, "AT_KSYM_BPF_PROG_ACTIVE": 0x2C4A8,
        "AT_NET_RX_SOFTIRQ": 3, "AT_TIMER_SOFTIRQ": 1}


@pytest.fixture(scope="module")
def host_facts():
    from acceptrace import selection

    return selection.prepare().facts


def variants(facts):
    """(label, facts, dispatch): the host's facts, then each thing a kernel may lack."""
    from acceptrace.kernel import SPANS

    span_names = {sp.name for sp in SPANS}
    raw = dict(facts.raw_tracepoints)
    no_rw = {k: v for k, v in raw.items() if "_length" not in k}
    no_kfree = {k: v for k, v in raw.items() if k != "kfree_skb"}
    no_v6 = {**facts.defines, "AT_HAVE_IPV6": 0}
    no_v6 = {k: v for k, v in no_v6.items() if not k.startswith("AT_OFF_SK_V6")}
    no_proto = {k: v for k, v in facts.defines.items() if k != "AT_OFF_SK_PROTOCOL"}
    no_proto["AT_HAVE_SK_PROTOCOL"] = 0
    no_spans = {k: (0 if k.endswith("_LEN") and k.removesuffix("_LEN") in span_names else v)
                for k, v in facts.defines.items()}
    no_spans["AT_HAVE_TASK_BTF"] = 0
    base = dataclasses.replace(facts, kprobes=True)
    return [
        ("as here", base, True),
        ("no dispatch", base, False),
        ("no 6.3 read/send tracepoints", dataclasses.replace(base, raw_tracepoints=no_rw), True),
        ("no kfree_skb", dataclasses.replace(base, raw_tracepoints=no_kfree), False),
        ("no TCP_LISTEN_OVERFLOW drop reason (before 6.15)",
         dataclasses.replace(base, defines={k: v for k, v in facts.defines.items()
                                            if k != "AT_DROP_REASON_LISTEN_OVERFLOW"}), False),
        ("no IPv6", dataclasses.replace(base, defines=no_v6), False),
        ("no sk_protocol", dataclasses.replace(base, defines=no_proto), False),
        ("fields read one by one (no contiguous spans, no bpf_get_current_task_btf)",
         dataclasses.replace(base, defines=no_spans), True),
        ("blind-spot counter", dataclasses.replace(base, busy=BUSY, busy_why=None), False),
    ]


@pytest.mark.parametrize("backend", ["tracepoint", "kprobe", "fentry"])
def test_source_compiles_for_every_kernel_variant(host_facts, backend):
    import bcc
    from acceptrace import hooks, selection
    from acceptrace.bpfloader import _CaptureFd2, translation_unit
    from acceptrace.errors import UserError
    from acceptrace.kernel import cflags

    for label, facts, dispatch in variants(host_facts):
        try:
            plan = selection.plan_backend(backend, facts, dispatch)
        except UserError as exc:
            if backend == "tracepoint" and "no 6.3" in label:
                continue  # the tracepoint backend refuses such a kernel: right
            raise AssertionError((label, str(exc))) from None
        text = translation_unit(BPF_DIR, plan.source)
        with _CaptureFd2() as cap:
            try:
                b = bcc.BPF(text=text.encode(), cflags=[f"-I{BPF_DIR}", *cflags(plan.defines())])
            except Exception as exc:  # noqa: BLE001 - bcc raises plain Exception
                msg = str(exc)
                compiled = "compile" not in msg.lower()
                assert compiled, (backend, label, cap.first_error() or msg)
                assert backend == "fentry", (backend, label, msg)  # only fentry may be refused
                continue
        try:
            for hook, glue in plan.rows():
                if glue == hooks.ATTACH_KPROBE:
                    for fn in hook.kprobe_programs():
                        if fn:
                            b.load_func(fn.encode(), bcc.BPF.KPROBE)  # the verifier, no attach
            if dispatch:
                b.load_func(b"on_dispatch_uprobe", bcc.BPF.KPROBE)
        finally:
            b.cleanup()
