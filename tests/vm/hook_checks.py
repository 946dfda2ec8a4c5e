"""Guest sanity check, independent of acceptrace: can this kernel attach the hooks
the backends use? Run by guest-init.sh when the runner asks for checks (CHECKS=1).

One line per check, "OK   name: detail" or "FAIL name: error" (fentry uses
KFUNC_PROBE, fexit KRETFUNC_PROBE); exit status 1 if any
check failed. Each check makes loopback connections and counts what its probe saw.
"""

from __future__ import annotations

import socket
import sys
import time
import traceback

from bcc import BPF

N = 5
results: list[tuple[str, bool, str]] = []


def connect_n(n: int = N) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    for _ in range(n):
        c = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
        c.sendall(b"x")
        a.recv(1)
        a.close()
        c.close()
    srv.close()
    time.sleep(0.1)


def check(name: str, text: str, attach=None, expect: int = N) -> None:
    t0 = time.monotonic()
    try:
        b = BPF(text=text, cflags=["-w"])
        if attach:
            attach(b)
        compiled = time.monotonic() - t0
        connect_n()
        seen = sum(v.value for v in b["counts"].values())
        ok = seen >= expect
        results.append((name, ok, f"{seen} events for {N} connections "
                                  f"(load+attach {compiled:.1f} s)"))
        b.cleanup()
    except Exception as e:  # any failure is a FAIL line
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
        results.append((name, False, msg.splitlines()[-1] if msg else repr(e)))


COUNTS = """
BPF_ARRAY(counts, u64, 1);
static inline void hit(void) { counts.atomic_increment(0); }
"""

check("kprobe:tcp_conn_request", COUNTS + "int on_req(void *ctx) { hit(); return 0; }",
      lambda b: b.attach_kprobe(event="tcp_conn_request", fn_name="on_req"))
check("kretprobe:inet_csk_accept", COUNTS + "int on_acc(void *ctx) { hit(); return 0; }",
      lambda b: b.attach_kretprobe(event="inet_csk_accept", fn_name="on_acc"))
check("fentry:tcp_conn_request",
      COUNTS + "KFUNC_PROBE(tcp_conn_request, void *rsk_ops, void *af_ops, void *sk)"
               " { hit(); return 0; }")
check("fexit:inet_csk_accept",
      COUNTS + "KRETFUNC_PROBE(inet_csk_accept, void *sk) { hit(); return 0; }")
check("raw_tracepoint:inet_sock_set_state",
      COUNTS + "RAW_TRACEPOINT_PROBE(inet_sock_set_state) { hit(); return 0; }")
check("raw_tracepoint:sk_data_ready",
      COUNTS + "RAW_TRACEPOINT_PROBE(sk_data_ready) { hit(); return 0; }")

print(f"BPF.support_kfunc() = {BPF.support_kfunc()}")
for name, ok, detail in results:
    print(f"{'OK  ' if ok else 'FAIL'} {name}: {detail}")
sys.exit(0 if all(ok for _, ok, _ in results) else 1)
