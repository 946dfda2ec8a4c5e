"""Feature checks and defines (no root): tracefs parsing, header trees, cflags."""

from __future__ import annotations

from pathlib import Path

import pytest
from acceptrace import headers, hooks, kernel
from acceptrace.errors import UserError

KFREE_SKB_6_18 = """name: kfree_skb
ID: 1577
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;

\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:40;\tsize:4;\tsigned:0;

print fmt: "skbaddr=%p"
"""


def fake_tracefs(tmp_path: Path, events: dict[str, str]) -> Path:
    for name, fmt in events.items():
        d = tmp_path / "events" / name
        d.mkdir(parents=True)
        (d / "format").write_text(fmt)
    return tmp_path


def test_tracepoint_fields_parses_format(tmp_path):
    tfs = fake_tracefs(tmp_path, {"skb/kfree_skb": KFREE_SKB_6_18})
    fields = kernel.tracepoint_fields(tfs, "skb", "kfree_skb")
    assert fields == {
        "skbaddr": "void *", "location": "void *", "rx_sk": "void *",
        "protocol": "unsigned short", "reason": "enum skb_drop_reason", "saddr": "__u8",
    }
    assert kernel.tracepoint_fields(tfs, "sock", "sk_data_ready") is None


@pytest.mark.root  # tracefs (/sys/kernel/tracing) is readable by root only
def test_tracepoint_fields_of_this_kernel():
    tfs = kernel.find_tracefs()
    if tfs is None:
        pytest.skip("tracefs not mounted (acceptrace mounts it as root)")
    f = kernel.tracepoint_fields(tfs, "sock", "inet_sock_set_state")
    assert f is not None and {"skaddr", "oldstate", "newstate", "sport", "dport"} <= set(f)


def test_cflags_only_ints():
    assert kernel.cflags({"AT_PORT": 8000, "AT_OFF_X": 12}) == ["-DAT_OFF_X=12", "-DAT_PORT=8000"]
    for bad in ({"AT_PORT": "8000; system()"}, {"AT PORT": 1}, {"AT_PORT": True},
                {"AT_X=1 -DY": 2}):
        with pytest.raises(ValueError):
            kernel.cflags(bad)  # type: ignore[arg-type]

    # 64-bit kernel addresses: unsigned hex, as clang takes them without a warning.
    assert kernel.cflags({"AT_KSYM_X": 0xFFFFFFFF82A0B000, "AT_Y": 0x7FFFFFFF}) == [
        "-DAT_KSYM_X=0xffffffff82a0b000ULL", "-DAT_Y=2147483647"]


KALLSYMS = """\
0000000000000000 A fixed_percpu_data
000000000002c4a8 D bpf_prog_active
000000000001f880 D current_kprobe
ffffffff82a0b000 R __per_cpu_offset
ffffffffc0a01000 t current_kprobe\t[some_module]
ffffffff81000000 T _stext
"""


def test_parse_kallsyms_takes_vmlinux_symbols():
    names = {"bpf_prog_active", "current_kprobe", "__per_cpu_offset", "fixed_percpu_data"}
    assert kernel.parse_kallsyms(KALLSYMS, names) == {
        "bpf_prog_active": 0x2C4A8, "current_kprobe": 0x1F880,
        "__per_cpu_offset": 0xFFFFFFFF82A0B000}  # 0 (hidden or zero-based) left out


def test_busy_defines_from_kallsyms_and_btf(btf_61):
    defines, why = kernel.busy_defines(btf_61, KALLSYMS)
    assert why is None
    assert defines == {"AT_KSYM_PER_CPU_OFFSET": 0xFFFFFFFF82A0B000,
                       "AT_KSYM_BPF_PROG_ACTIVE": 0x2C4A8, "AT_KSYM_CURRENT_KPROBE": 0x1F880,
                       "AT_NET_RX_SOFTIRQ": 3, "AT_TIMER_SOFTIRQ": 1}
    # kptr_restrict=2 shows every address as 0; no KALLSYMS_ALL shows no data symbols.
    hidden = KALLSYMS.replace("ffffffff82a0b000", "0000000000000000")
    for text in (hidden, "ffffffff81000000 T _stext\n"):
        defines, why = kernel.busy_defines(btf_61, text)
        assert defines == {} and why is not None and "__per_cpu_offset" in why


def test_offsets_of_this_kernel_resolve():
    if not kernel.btf_path().exists():
        pytest.skip("no BTF on this machine")
    defines, _notes = kernel.resolve_offsets(kernel.load_btf())
    for name in kernel.OFFSETS:
        assert name in defines
    assert defines["AT_TCP_LISTEN"] == 10 and defines["AT_TCP_ESTABLISHED"] == 1
    assert defines["AT_TCP_SYN_RECV"] == 3 and defines["AT_TCP_CLOSE"] == 7


def test_missing_btf_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv(kernel.BTF_PATH_ENV, str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no BTF"):
        kernel.load_btf()


def make_debian_headers(root: Path, version: str) -> None:
    common = root / f"linux-headers-{version}-common"
    arch = root / f"linux-headers-{version}-amd64"
    (common / "include" / "linux").mkdir(parents=True)
    (common / "include" / "linux" / "kconfig.h").write_text("/* common */\n")
    (common / "Makefile").write_text("common\n")
    (arch / "include" / "generated").mkdir(parents=True)
    (arch / "include" / "generated" / "autoconf.h").write_text("/* arch */\n")
    (arch / "Makefile").write_text("arch\n")


def test_header_tree_merges_newest_debian_pair(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_debian_headers(src, "6.1.0-9")
    make_debian_headers(src, "6.1.0-56")
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setenv(headers.CACHE_ENV, str(tmp_path / "cache"))
    tree = headers.find_header_tree(release="0.0.0-none", src_root=src)
    assert tree.kind == "merged"
    assert tree.path is not None and "6.1.0-56" in tree.path.name
    # Both halves visible through one directory; the arch half wins on conflicts.
    assert (tree.path / "include" / "linux" / "kconfig.h").read_text() == "/* common */\n"
    assert (tree.path / "include" / "generated" / "autoconf.h").exists()
    assert (tree.path / "Makefile").read_text() == "arch\n"
    assert "safe: offsets come from BTF" in tree.description
    again = headers.find_header_tree(release="0.0.0-none", src_root=src)
    assert again.path == tree.path  # cached, not rebuilt


def test_no_header_tree_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    with pytest.raises(UserError, match="no kernel header tree"):
        headers.find_header_tree(release="0.0.0-none", src_root=tmp_path)


def test_bcc_kernel_source_env_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    tree = headers.find_header_tree(release="0.0.0-none", src_root=tmp_path)
    assert tree.kind == "env" and tree.path == tmp_path


# -- function hooks, from BTF: Debian's 6.1 (a fixture) and the running kernel ---------

def test_function_hooks_on_debian_6_1(btf_61):
    """6.1.192: old inet_csk_accept, 7-argument syn_recv_sock (the 2026 backport),
    hash_add already bool; every hooked function present."""
    args, sigs = kernel.probe_functions(btf_61)
    assert set(args) == {h.point for h in hooks.rows("function")}
    assert args["tcp_v4_syn_recv_sock"] == 7
    assert sigs["inet_csk_accept"] == (
        "struct sock * inet_csk_accept(struct sock *sk, int flags, int *err, bool kern)")
    assert sigs["inet_csk_reqsk_queue_hash_add"].startswith("bool ")
    assert sigs["tcp_recvmsg"].count(",") == 4          # 5 arguments on 6.1
    # Offsets the function hooks read, from this BTF (not the host's)
    defines, missing = kernel.func_offsets(btf_61)
    assert missing == []
    assert defines["AT_OFF_SKB_HEAD"] == 200
    assert defines["AT_OFF_NET_SYNCOOKIES"] == 1123


def test_function_hooks_on_the_running_kernel():
    btf = kernel.load_btf()
    args, sigs = kernel.probe_functions(btf)
    assert kernel.func_offsets(btf)[1] == []
    accept_args = btf.func_arg_count("inet_csk_accept")
    assert accept_args in (2, 4) and args["inet_csk_accept"] == accept_args
    assert sigs["inet_csk_accept"].count(",") == accept_args - 1


def test_offset_table_has_each_define_once():
    names = [o.define for o in kernel.OFFSET_TABLE]
    assert len(names) == len(set(names))
    assert all(o.flag for o in kernel.OFFSET_TABLE if o.need == "optional")
