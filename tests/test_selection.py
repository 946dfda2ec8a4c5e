"""Backend selection without a kernel: plans from Debian 6.1's BTF, a fake loader.

Pure unit tests (any user, no BPF): which hooks each backend compiles in and
why, what a missing hook nulls, the auto order and its refusal reasons, and the
fentry backend's fallback to kprobes for tcp_v{4,6}_syn_recv_sock.
"""

from __future__ import annotations

import dataclasses

import pytest
from acceptrace import bootmemo, hooks, kernel, selection
from acceptrace.errors import KernelRefused, UserError

ALL_TRACEPOINTS = {
    "syscalls:sys_exit_accept4": ["ret"],
    "syscalls:sys_exit_accept": ["ret"],
}
# every raw tracepoint the catalogue hooks, with a 6.18 kernel's argument counts
ALL_RAW = {"sk_data_ready": 1, "inet_sock_set_state": 3, "sock_recv_length": 3,
           "sock_send_length": 3, "tcp_retransmit_synack": 2, "kfree_skb": 4,
           "softirq_entry": 1, "softirq_exit": 1, "netif_receive_skb": 1}
BUSY = {"AT_KSYM_PER_CPU_OFFSET": 1, "AT_KSYM_BPF_PROG_ACTIVE": 2, "AT_NET_RX_SOFTIRQ": 3,
        "AT_TIMER_SOFTIRQ": 1}


@pytest.fixture(scope="module")
def facts61(btf_61) -> kernel.KernelFacts:
    """Debian 6.1's facts, with every tracepoint present and kprobes on."""
    defines, notes = kernel.resolve_offsets(btf_61)
    defines["AT_DROP_REASON_LISTEN_OVERFLOW"] = 77  # a 6.15+ kernel's enum, for kfree_skb
    func_defines, func_missing = kernel.func_offsets(btf_61)
    args, sigs = kernel.probe_functions(btf_61)
    return kernel.KernelFacts(
        release="6.1.0-test", defines=defines, notes=notes, func_defines=func_defines,
        func_missing=func_missing, func_args=args, signatures=sigs,
        tracepoints=dict(ALL_TRACEPOINTS), busy={}, busy_why="no kallsyms here", kprobes=True,
        raw_tracepoints=dict(ALL_RAW))


def change(facts: kernel.KernelFacts, **kw: object) -> kernel.KernelFacts:
    return dataclasses.replace(facts, **kw)  # type: ignore[arg-type]


def test_every_row_is_well_formed():
    names = [h.name for h in hooks.CATALOGUE]
    assert len(names) == len(set(names))
    for h in hooks.CATALOGUE:
        assert h.backends and set(h.backends) <= set(hooks.BACKENDS), h.name
        assert set(h.required) <= set(h.backends), h.name
        assert h.replaced_by is None or h.replaced_by in hooks.BY_NAME, h.name
        assert h.why, h.name
        if h.kind == "tracepoint":
            assert ":" in h.point and h.fields, h.name


def test_each_backends_glue_is_in_its_source():
    """Every row a backend can choose has glue in that backend's source, and no
    source has glue for a row that is not its own."""
    from pathlib import Path

    bpf = Path(__file__).resolve().parent.parent / "bpf"
    for backend, src in hooks.SOURCES.items():
        text = (bpf / src).read_text()
        for h in hooks.CATALOGUE:
            assert (h.define in text) == (backend in h.backends), (backend, h.name)


def test_function_backends_plan_every_hook_on_6_1(facts61):
    for name in ("fentry", "kprobe"):
        plan = selection.plan_backend(name, facts61, dispatch=True)
        glue = hooks.ATTACH_FENTRY if name == "fentry" else hooks.ATTACH_KPROBE
        for row in ("tcp_conn_request", "inet_csk_accept", "tcp_v4_syn_recv_sock"):
            assert plan.chosen[row] == glue
        # The 6.3+ tracepoints replace the kretprobe-shaped read/write hooks.
        assert plan.chosen["sock_recv_length"] == hooks.ATTACH_RAW_TRACEPOINT
        assert "tcp_recvmsg" not in plan.chosen and "tcp_sendmsg" not in plan.chosen
        assert plan.missing == [] and plan.missing_stages == set()
        assert plan.exact_drops and plan.ack_overflow_observable
        assert not plan.busy_counted and any("softirqs_busy not counted" in n for n in plan.notes)
        d = plan.defines()
        assert d["AT_HOOK_SK_DATA_READY"] == hooks.ATTACH_OFF  # not a function backend's
        assert d["AT_DISPATCH"] == 1 and d["AT_COUNT_BUSY"] == 0
        assert d["AT_OFF_SKB_HEAD"] == 200  # the function hooks' own offsets
        assert all(type(v) is int for v in d.values())


def test_without_read_tracepoints_the_function_hooks_read(facts61):
    raw = {k: v for k, v in ALL_RAW.items() if "length" not in k}
    plan = selection.plan_backend("kprobe", change(facts61, raw_tracepoints=raw), dispatch=True)
    assert plan.chosen["tcp_recvmsg"] == plan.chosen["tcp_sendmsg"] == hooks.ATTACH_KPROBE
    assert plan.points()[-2:] == ["raw_tracepoint:inet_sock_set_state",
                                  "raw_tracepoint:tcp_retransmit_synack"]
    # the response hook is there without --dispatch too: read_to_response for any server
    plan = selection.plan_backend("kprobe", change(facts61, raw_tracepoints=raw),
                                  dispatch=False)
    assert plan.chosen["tcp_sendmsg"] == hooks.ATTACH_KPROBE
    assert "read_to_response" not in plan.missing_stages


def test_missing_optional_hook_nulls_its_stages(facts61):
    args = dict(facts61.func_args)
    del args["inet_csk_accept"]
    args["tcp_v6_syn_recv_sock"] = 1  # fewer than the 2 the glue reads: not there
    plan = selection.plan_backend("fentry", change(facts61, func_args=args), dispatch=False)
    assert {"inet_csk_accept", "tcp_v6_syn_recv_sock"} <= set(plan.missing)
    assert {"accept_queue", "syn_to_accept", "accept_to_read"} <= plan.missing_stages
    assert "handshake" not in plan.missing_stages
    assert any("inet_csk_accept is not in this kernel's BTF" in n for n in plan.notes)
    assert any("takes 1 arguments here, fewer than the 2" in n for n in plan.notes)
    assert plan.defines()["AT_HOOK_INET_CSK_ACCEPT"] == hooks.ATTACH_OFF


def test_required_hook_missing_refuses_the_backend(facts61):
    args = {k: v for k, v in facts61.func_args.items() if k != "inet_csk_complete_hashdance"}
    with pytest.raises(UserError, match="inet_csk_complete_hashdance"):
        selection.plan_backend("kprobe", change(facts61, func_args=args), dispatch=False)
    args = dict(facts61.func_args, tcp_conn_request=3)
    with pytest.raises(UserError, match="takes 3 arguments"):
        selection.plan_backend("fentry", change(facts61, func_args=args), dispatch=False)
    with pytest.raises(UserError, match="sk_buff.head"):
        selection.plan_backend("fentry", change(facts61, func_missing=["lacks sk_buff.head"]),
                               dispatch=False)
    with pytest.raises(UserError, match="CONFIG_KPROBES"):
        selection.plan_backend("kprobe", change(facts61, kprobes=False), dispatch=False)
    raw = {k: v for k, v in ALL_RAW.items() if k != "sk_data_ready"}
    with pytest.raises(UserError, match="sk_data_ready .*Linux 6.3"):
        selection.plan_backend("tracepoint", change(facts61, raw_tracepoints=raw),
                               dispatch=False)
    # a kfree_skb without rx_sk (before 6.11): not hooked, a note says why
    plan = selection.plan_backend("tracepoint", change(facts61, raw_tracepoints={
        **ALL_RAW, "kfree_skb": 3}), dispatch=False)
    assert "kfree_skb" in plan.missing
    assert any("passes 3 arguments here, fewer than the 4" in n for n in plan.notes)


def test_tracepoint_backend_and_the_ack_overflow_split(facts61):
    plan = selection.plan_backend("tracepoint", facts61, dispatch=False)
    assert plan.ack_overflow_observable and not plan.exact_drops
    # no --dispatch: the first response is still timed, for any server
    assert plan.chosen["sock_send_length"] == hooks.ATTACH_RAW_TRACEPOINT
    defines = {k: v for k, v in facts61.defines.items() if k != "AT_DROP_REASON_LISTEN_OVERFLOW"}
    plan = selection.plan_backend("tracepoint", change(facts61, defines=defines), dispatch=True)
    assert "kfree_skb" in plan.missing and not plan.ack_overflow_observable
    assert selection.ACK_OVERFLOW_NOTE in plan.notes
    assert "AT_OFF_SKB_HEAD" not in plan.defines()  # the function hooks' offsets stay out


def test_blind_spot_rows_follow_kallsyms_and_kprobes(facts61):
    busy = change(facts61, busy=BUSY, busy_why=None)
    fentry = selection.plan_backend("fentry", busy, dispatch=False)
    assert fentry.busy_counted and not fentry.unseen_counted
    kprobe = selection.plan_backend("kprobe", busy, dispatch=False)
    assert kprobe.busy_counted and kprobe.unseen_counted
    d = kprobe.defines()
    assert d["AT_COUNT_UNSEEN"] == 1 and d["AT_HAVE_KSYM_CURRENT_KPROBE"] == 0
    assert kprobe.points()[-3:] == ["raw_tracepoint:softirq_entry",
                                    "raw_tracepoint:softirq_exit",
                                    "raw_tracepoint:netif_receive_skb"]
    # the fentry backend whose syn_recv_sock fell back to kprobes counts them too
    fb = selection.plan_backend("fentry", busy, dispatch=False,
                                overrides={"tcp_v4_syn_recv_sock": hooks.ATTACH_KPROBE})
    assert fb.unseen_counted and fb.points().count("kprobe:tcp_v4_syn_recv_sock") == 1


class FakeBackend:
    def __init__(self, plan: hooks.Plan) -> None:
        self.plan = plan
        self.name = plan.backend
        self.notes = plan.notes
        self.closed = False


class FakeLoader:
    """Refuses what it is told to, records every plan it was handed."""

    def __init__(self, refuse: dict[str, Exception] | None = None,
                 refuse_fentry_syn_recv: bool = False) -> None:
        self.refuse = refuse or {}
        self.refuse_syn_recv = refuse_fentry_syn_recv
        self.plans: list[hooks.Plan] = []

    def __call__(self, plan: hooks.Plan) -> FakeBackend:
        self.plans.append(plan)
        if plan.backend in self.refuse:
            raise self.refuse[plan.backend]
        if (self.refuse_syn_recv and plan.backend == "fentry"
                and plan.chosen.get("tcp_v4_syn_recv_sock") == hooks.ATTACH_FENTRY):
            raise UserError("BPF program fentry.bpf.c failed to load: too many arguments")
        return FakeBackend(plan)


@pytest.fixture
def memo_dir(tmp_path, monkeypatch):
    """BootMemo in a directory of this test's (the fentry memos are per boot)."""
    monkeypatch.setattr(bootmemo.BootMemo, "DIR", tmp_path)
    monkeypatch.setattr(bootmemo, "boot_id", lambda: "test-boot")
    return tmp_path


def test_auto_takes_the_first_that_loads_and_says_why_not_the_others(facts61, memo_dir):
    said: list[str] = []
    loader = FakeLoader({"fentry": KernelRefused("EPERM: a kernel security policy")})
    prep = selection.Prepared(facts=change(facts61, kprobes=False))
    backend = selection.choose_backend("auto", prep, False, said.append, loader)
    assert backend.name == "tracepoint"
    assert [p.backend for p in loader.plans] == ["fentry", "tracepoint"]  # kprobe: not loaded
    assert said[0].startswith("fentry backend unavailable (EPERM")
    assert "CONFIG_KPROBES" in said[1]
    assert backend.notes[0].startswith("backend auto: fentry: EPERM")
    # the policy refusal is remembered for the boot: no second compile
    loader = FakeLoader()
    backend = selection.choose_backend("auto", prep, False, said.append, loader)
    assert backend.name == "tracepoint" and [p.backend for p in loader.plans] == ["tracepoint"]


def test_forced_backend_fails_in_one_line(facts61, memo_dir):
    prep = selection.Prepared(facts=change(facts61, kprobes=False))
    with pytest.raises(UserError, match=r"^the kprobe backend cannot run here: kprobes are not"):
        selection.choose_backend("kprobe", prep, False, print, FakeLoader())
    with pytest.raises(UserError, match="--backend must be one of"):
        selection.choose_backend("ebpf", prep, False, print, FakeLoader())
    loader = FakeLoader({n: UserError(f"{n} refused") for n in selection.AUTO_ORDER})
    with pytest.raises(UserError, match="no backend can run on this kernel: fentry: fentry "
                                        "refused; kprobe: kprobe refused; tracepoint: "):
        selection.choose_backend("auto", selection.Prepared(facts=facts61), False,
                                 lambda _m: None, loader)


def test_fentry_falls_back_to_kprobes_for_syn_recv_sock(facts61, memo_dir):
    prep = selection.Prepared(facts=facts61)
    loader = FakeLoader(refuse_fentry_syn_recv=True)
    backend = selection.open_backend("fentry", prep, False, loader)
    assert len(loader.plans) == 2
    plan = backend.plan
    assert plan.chosen["tcp_v4_syn_recv_sock"] == hooks.ATTACH_KPROBE
    assert plan.chosen["tcp_v6_syn_recv_sock"] == hooks.ATTACH_KPROBE
    assert plan.chosen["tcp_conn_request"] == hooks.ATTACH_FENTRY
    assert plan.ack_overflow_observable
    assert any("fexit on tcp_v4_syn_recv_sock refused (BPF program" in n for n in plan.notes)
    # remembered: the next start goes straight to the fallback
    loader = FakeLoader(refuse_fentry_syn_recv=True)
    selection.open_backend("fentry", prep, False, loader)
    assert len(loader.plans) == 1
    # no kprobes: those rows are not hooked and final-ACK drops are null
    backend = selection.open_backend("fentry", selection.Prepared(facts=change(
        facts61, kprobes=False)), False, FakeLoader(refuse_fentry_syn_recv=True))
    assert not backend.plan.ack_overflow_observable
    assert "tcp_v4_syn_recv_sock" in backend.plan.missing
    assert any("no kprobes either" in n for n in backend.plan.notes)
