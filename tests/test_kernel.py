"""Feature checks and defines (no root): tracefs parsing, header trees, cflags."""

from __future__ import annotations

from pathlib import Path

import pytest
from acceptrace import headers, kernel
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
