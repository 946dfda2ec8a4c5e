#!/bin/bash
# PID 1 of the acceptrace QEMU guest (exec'd by /sbin/acceptrace-vm-init from
# the image, which has mounted the repository read-only at /mnt/src and the
# host's results directory at /results). No systemd: mount what the tests
# need, install the working tree, run the root tests once per backend, write
# everything to /results, power off. The host's tests/vm/run.py writes
# /results/config.sh (LABEL, BACKENDS, TESTS_<backend>, TIMEOUT_<backend>,
# PYTEST_EXTRA, CHECKS, CHECKS_TIMEOUT) before booting us. The tests see
# ACCEPTRACE_TEST_VM=1 (an emulated CPU: timings are ~10x the host's),
# ACCEPTRACE_TEST_BACKEND and ACCEPTRACE_TEST_TIME_SCALE (tests/vm/calibrate.py, measured per backend).
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH HOME=/root LANG=C.UTF-8 TERM=dumb PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export ACCEPTRACE_TEST_VM=1
R=/results

poweroff_now() {
    sync
    echo "acceptrace-vm: powering off" >/dev/console
    echo o >/proc/sysrq-trigger
    sleep 30
}
trap poweroff_now EXIT

say() { echo "acceptrace-vm: $*" >/dev/console; }
stamp() { echo "$1=$(cut -d' ' -f1 /proc/uptime)" >>"$R/timings"; }
now() { cut -d' ' -f1 /proc/uptime; }

stamp init_start
mnt() { # type source target [options]
    mountpoint -q "$3" && return 0
    mkdir -p "$3"
    mount -t "$1" ${4:+-o "$4"} "$2" "$3" || say "could not mount $1 on $3"
}
mnt devpts devpts /dev/pts
mnt tmpfs tmpfs /dev/shm mode=1777
mnt tmpfs tmpfs /tmp mode=1777
mnt tmpfs tmpfs /run mode=755
mnt bpf bpf /sys/fs/bpf
mnt tracefs tracefs /sys/kernel/tracing
mnt debugfs debugfs /sys/kernel/debug
mnt cgroup2 cgroup2 /sys/fs/cgroup
hostname acceptrace-vm
ip link set lo up
ulimit -n 65536
ulimit -l unlimited

# shellcheck source=/dev/null
. "$R/config.sh"
: "${LABEL:=guest}" "${BACKENDS:=fentry kprobe tracepoint}"

{
    echo "label: $LABEL"
    echo "uname: $(uname -a)"
    echo "cmdline: $(cat /proc/cmdline)"
    echo "nproc: $(nproc)"
    echo "python: $(python3 --version 2>&1)"
    echo "bcc: $(python3 -c 'import bcc; print(bcc.__version__)' 2>&1)"
    echo "btf: $(ls -l /sys/kernel/btf/vmlinux 2>&1)"
    echo "headers: $(readlink -f "/lib/modules/$(uname -r)/build")"
    if [ -r /proc/config.gz ]; then cfg="zcat /proc/config.gz"; src=/proc/config.gz
    else cfg="cat /boot/config-$(uname -r)"; src=/boot/config-$(uname -r); fi
    echo "config ($src):"
    $cfg 2>/dev/null | grep -E '^(# )?CONFIG_(KPROBES|KPROBE_EVENTS|KRETPROBES|FTRACE|FUNCTION_TRACER|DYNAMIC_FTRACE|DYNAMIC_FTRACE_WITH_DIRECT_CALLS|FPROBE|BPF|BPF_SYSCALL|BPF_JIT|BPF_EVENTS|DEBUG_INFO_BTF|IKHEADERS|IKCONFIG_PROC)[ =]' | sed 's/^/  /'
    echo "unprivileged_bpf_disabled: $(cat /proc/sys/kernel/unprivileged_bpf_disabled 2>&1)"
    echo "tracepoints:"
    for tp in sock/sk_data_ready sock/sock_recv_length sock/inet_sock_set_state tcp/tcp_retransmit_synack skb/kfree_skb; do
        if [ -d "/sys/kernel/tracing/events/$tp" ]; then echo "  $tp yes"; else echo "  $tp no"; fi
    done
} >"$R/info.txt" 2>&1
say "$(uname -r): $(grep '^bcc:' "$R/info.txt")"

# The working tree as it is now (not a cached copy): copy, then install it.
t=$(now)
mkdir -p /tmp/src
tar -C /mnt/src --exclude=./.git --exclude=./.venv --exclude='*.egg-info' --exclude=./build \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache --exclude=./out -cf - . | tar -C /tmp/src -xf -
stamp copied
if ! python3 -m pip install --quiet --break-system-packages --no-deps --no-build-isolation \
        --no-index /tmp/src >"$R/install.log" 2>&1; then
    say "installing the project failed:"; tail -20 "$R/install.log" >/dev/console
    echo "install failed" >"$R/failed"
    exit 1
fi
stamp installed
say "project installed in $(awk -v a="$t" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}') s"

if [ "${CHECKS:-0}" = 1 ]; then
    say "hook checks"
    t=$(now)
    timeout -k 10 "${CHECKS_TIMEOUT:-180}" python3 /tmp/src/tests/vm/hook_checks.py >"$R/$LABEL-checks.log" 2>&1
    echo "rc=$? seconds=$(awk -v a="$t" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')" >>"$R/$LABEL-checks.log"
    stamp checks
fi

# Hold the hot tracepoints acceptrace attaches to, so its runs patch no hot
# kernel text under TCG (why: tests/vm/pin_tracepoints.py).
python3 /tmp/src/tests/vm/pin_tracepoints.py >"$R/pin.log" 2>&1 &
for _ in $(seq 150); do grep -q ready "$R/pin.log" 2>/dev/null && break; sleep 0.2; done
grep -q ready "$R/pin.log" || say "pinning the hot tracepoints failed: $(tail -1 "$R/pin.log")"
stamp pinned

cd /tmp/src || exit 1
read -r -a extra <<<"${PYTEST_EXTRA:-}"
for b in $BACKENDS; do
    # This backend's tests (files or node ids) and its timeout on a quiet machine.
    v="TESTS_$b"; read -r -a tests <<<"${!v:-}"
    present=()
    for f in "${tests[@]}"; do [ -e "${f%%::*}" ] && present+=("$f") || say "no ${f%%::*} here: skipped"; done
    v="TIMEOUT_$b"; base=${!v:-900}
    # How fast is this guest now? (TCG on a busy host is slower than on a quiet
    # one.) The tests' timeouts scale with it, and so does this backend's.
    # Measured before each backend, since the host's load changes.
    cal=$(python3 /tmp/src/tests/vm/calibrate.py) || cal="seconds=0 scale=1 backend_factor=1"
    eval "$cal"
    bt=$(awk -v t="$base" -v f="$backend_factor" 'BEGIN{printf "%d", t*f}')
    echo "scale_$b=$scale" >>"$R/timings"
    say "backend $b: pytest ${present[*]} (calibration: $cal; timeout $bt s)"
    t=$(now)
    if [ ${#present[@]} -eq 0 ]; then
        rc=5
    else
        # SIGINT first: pytest then ends the running test with KeyboardInterrupt,
        # prints its failure summary and writes the junit file; SIGKILL 60 s later.
        # faulthandler dumps every thread's stack of a test running past a quarter
        # of the budget, so a hang says where it hung. Every acceptrace start the
        # tests make writes its "started in" line to $LABEL-$b.starts.
        ACCEPTRACE_TEST_BACKEND=$b ACCEPTRACE_TEST_TIME_SCALE=$scale \
            ACCEPTRACE_TEST_START_LOG="$R/$LABEL-$b.starts" \
            timeout -s INT -k 60 "$bt" \
            python3 -m pytest -m root -p no:cacheprovider -v -rA --durations=0 \
            -o faulthandler_timeout=$((bt / 4)) \
            -o junit_logging=system-err -o junit_log_passing_tests=false "${extra[@]}" \
            "${present[@]}" --junitxml="$R/$LABEL-$b.xml" >"$R/$LABEL-$b.log" 2>&1
        rc=$?
    fi
    secs=$(awk -v a="$t" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')
    echo "rc=$rc seconds=$secs timeout=$bt scale=$scale" >"$R/$LABEL-$b.status"
    stamp "backend_$b"
    say "backend $b: rc=$rc in $secs s ($(tail -1 "$R/$LABEL-$b.log"))"
done
echo ok >"$R/done"
