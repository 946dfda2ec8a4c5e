#!/usr/bin/env bash
# make test-lab: the lab's Vagrant VM booted for real, and the lab run inside it.
#
#   1. a local box from a Debian trixie root filesystem (tests/labvm/build-box.sh; cached)
#   2. vagrant box add (into $ACCEPTRACE_LAB_CACHE/vagrant.d, the VAGRANT_HOME of these runs)
#   3. a network namespace of this run, libvirtd and virtlogd started inside it: the
#      VM's NAT network (vagrant-libvirt's management network) exists only there
#   4. vagrant up --provider libvirt, inside the namespace: the domain type is qemu
#      (TCG: KVM hangs on the development machine), provisioning is vagrant/provision.sh
#      (make setup), exactly what a user's box runs
#   5. vagrant ssh -c 'sudo acceptrace lab run all --backend fentry'
#   6. teardown, also on failure or interruption: the domain and its volumes, the
#      networks and pool it made, libvirtd, virtlogd, dnsmasq, the namespace
#
# Results (console log, each step's output, the lab's files, timings):
# $ACCEPTRACE_LAB_RESULTS (default /tmp/acceptrace-lab-vm-<time>).  Exit status: the
# lab's inside the VM (0: every cause named), or 1 if a step before it failed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${ACCEPTRACE_LAB_CACHE:-/var/cache/acceptrace-lab}
RESULTS=${ACCEPTRACE_LAB_RESULTS:-/tmp/acceptrace-lab-vm-$(date +%Y%m%d-%H%M%S)}
NS=atlab-vm-$$
BOX_NAME=acceptrace-lab-local
LIBVIRT=qemu:///system

export VAGRANT_HOME=$CACHE/vagrant.d
export VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_NO_COLOR=1
export ACCEPTRACE_BOX=$BOX_NAME ACCEPTRACE_LIBVIRT_DRIVER=qemu
export ACCEPTRACE_VM_MEMORY=${ACCEPTRACE_VM_MEMORY:-4096}
export ACCEPTRACE_VM_CONSOLE=$RESULTS/console.log
export LIBVIRT_DEFAULT_URI=$LIBVIRT

mkdir -p "$RESULTS"
chmod 0777 "$RESULTS"   # libvirt's qemu (user libvirt-qemu) writes the console log here
T0=$(date +%s)
log() { printf '[test-lab %(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$RESULTS/steps.log" >&2; }
timing() { printf '%-28s %5d s\n' "$1" "$2" >> "$RESULTS/timings"; }
in_ns() { ip netns exec "$NS" "$@"; }

# A copy of the working tree to run vagrant in (its .vagrant/ and the rsync source).
SRC=$RESULTS/src
rsync -a --delete --exclude .git --exclude .venv --exclude lab-results \
    --exclude '__pycache__' --exclude '*.egg-info' --exclude .vagrant "$REPO/" "$SRC/"

NS_MADE=0
POOL_MADE=0
teardown() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    log "teardown"
    local t=$(date +%s)
    if [ "$NS_MADE" = 1 ]; then
        (cd "$SRC/vagrant" && timeout 300 ip netns exec "$NS" vagrant destroy -f) \
            >> "$RESULTS/teardown.log" 2>&1
        for d in $(in_ns virsh list --all --name 2>/dev/null); do
            in_ns virsh destroy "$d"; in_ns virsh undefine "$d" --remove-all-storage
        done >> "$RESULTS/teardown.log" 2>&1
        for v in $(in_ns virsh vol-list default 2>/dev/null | awk 'NR>2 && $1 {print $1}'); do
            case "$v" in acceptrace*|*"$BOX_NAME"*|vagrant*) in_ns virsh vol-delete "$v" --pool default ;; esac
        done >> "$RESULTS/teardown.log" 2>&1
        in_ns virsh net-destroy vagrant-libvirt >> "$RESULTS/teardown.log" 2>&1
        in_ns virsh net-undefine vagrant-libvirt >> "$RESULTS/teardown.log" 2>&1
        if [ "$POOL_MADE" = 1 ]; then
            in_ns virsh pool-destroy default >> "$RESULTS/teardown.log" 2>&1
            in_ns virsh pool-undefine default >> "$RESULTS/teardown.log" 2>&1
        fi
        for p in $(ip netns pids "$NS" 2>/dev/null); do kill "$p" 2>/dev/null; done
        sleep 2
        for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        ip netns del "$NS"
    fi
    timing teardown $(( $(date +%s) - t ))
    timing total $(( $(date +%s) - T0 ))
    log "results in $RESULTS (timings: $(tr '\n' ';' < "$RESULTS/timings"))"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() {   # step NAME COMMAND...: timed, output to RESULTS/NAME.log
    local name=$1; shift
    log "$name"
    local t=$(date +%s) rc=0
    "$@" > "$RESULTS/$name.log" 2>&1 || rc=$?
    timing "$name" $(( $(date +%s) - t ))
    if [ "$rc" != 0 ]; then
        log "$name failed ($rc); the end of its output:"
        tail -25 "$RESULTS/$name.log" >&2
        return "$rc"
    fi
}

step build-box bash -c "'$HERE/build-box.sh' > '$RESULTS/box-path'"
BOX=$(tail -1 "$RESULTS/box-path")
KEY=$(basename "$(dirname "$BOX")")
if [ "$(cat "$CACHE/box-added" 2>/dev/null)" != "$KEY" ]; then
    step box-add vagrant box add --force --name "$BOX_NAME" "$BOX"
    echo "$KEY" > "$CACHE/box-added"
fi

log "network namespace $NS; libvirtd and virtlogd inside it"
ip netns add "$NS"
NS_MADE=1
ip -n "$NS" link set lo up
in_ns virtlogd -d
in_ns libvirtd -d
for _ in $(seq 100); do in_ns virsh version >/dev/null 2>&1 && break; sleep 0.2; done
in_ns virsh version > "$RESULTS/libvirt.txt" 2>&1
if ! in_ns virsh pool-info default >/dev/null 2>&1; then
    mkdir -p /var/lib/libvirt/images
    in_ns virsh pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
    in_ns virsh pool-start default >/dev/null
    POOL_MADE=1
fi

cd "$SRC/vagrant"
step vagrant-up in_ns vagrant up --provider libvirt
in_ns virsh dumpxml "$(in_ns virsh list --name | head -1)" > "$RESULTS/domain.xml" 2>&1 || true
in_ns ip -br addr > "$RESULTS/namespace-addresses.txt" 2>&1 || true
step guest-info in_ns vagrant ssh -c \
    'uname -a; nproc; free -m; ls /sys/kernel/btf/vmlinux; sudo acceptrace --version'

LAB_RC=0
log "lab-run: vagrant ssh -c 'sudo acceptrace lab run all --backend fentry'"
t=$(date +%s)
in_ns vagrant ssh -c 'cd /tmp && sudo acceptrace lab run all --backend fentry --out /tmp/lab-results' \
    > "$RESULTS/lab-run.log" 2>&1 || LAB_RC=$?
timing lab-run $(( $(date +%s) - t ))
in_ns vagrant ssh -c 'sudo tar -C /tmp -czf - lab-results' > "$RESULTS/lab-results.tgz" 2>/dev/null \
    || true
tail -30 "$RESULTS/lab-run.log" >&2
log "lab run all inside the VM: exit $LAB_RC"
echo "$LAB_RC" > "$RESULTS/lab-run.status"
exit "$LAB_RC"
