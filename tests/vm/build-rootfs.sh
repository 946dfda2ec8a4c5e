#!/usr/bin/env bash
# Builds (once) the Debian bookworm root filesystem the QEMU guests boot: an
# ext4 image plus, beside it, the vmlinuz and initrd of each guest kernel.
#
#   tests/vm/build-rootfs.sh            build if needed; print the image directory
#   tests/vm/build-rootfs.sh --key      print the cache key only
#   tests/vm/build-rootfs.sh --print    print the image directory if built (exit 1 if not)
#
# Cache: $ACCEPTRACE_VM_CACHE (default /var/cache/acceptrace-vm), outside the
# repository. The image lives in $CACHE/rootfs-<key>/, where <key> hashes the
# package list (with the resolved 6.12 kernel), this script and the project's
# Python dependencies. A changed key builds a new image next to the old one and
# removes the old one only once the new one is complete. The image is never
# written to by a guest (QEMU boots it with snapshot=on).
#
# Needs root, debootstrap, mkfs.ext4 (e2fsprogs >= 1.43 for -d) and a pip on
# the host ($ACCEPTRACE_VM_PIP, default "python3 -m pip") that can reach PyPI.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SCRIPT="$HERE/$(basename "${BASH_SOURCE[0]}")"
CACHE=${ACCEPTRACE_VM_CACHE:-/var/cache/acceptrace-vm}
MIRROR=${ACCEPTRACE_VM_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PIP=${ACCEPTRACE_VM_PIP:-python3 -m pip}

# The second guest kernel: the newest bookworm 6.12 whose unsigned image and
# headers are both in the host's apt lists (a bookworm host), else this pin.
KERNEL2_PIN=6.12.117+deb12-amd64

# Packages besides the kernels. No recommends are installed.
PACKAGES="python3 python3-bpfcc bpfcc-tools bpftool iproute2 procps kmod python3-pip python3-setuptools
python3-wheel python3-venv ca-certificates initramfs-tools zstd util-linux coreutils nginx-light"
# Python packages from pyproject.toml not wanted in the guest (the linters).
PY_EXCLUDE="ruff mypy"

log() { printf '[build-rootfs %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

resolve_kernel2() {
    if [ -n "${ACCEPTRACE_VM_KERNEL2:-}" ]; then echo "$ACCEPTRACE_VM_KERNEL2"; return; fi
    local codename="" best=""
    codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || true
    if [ "$codename" = "$SUITE" ] && command -v apt-cache >/dev/null; then
        best=$(comm -12 \
            <(apt-cache pkgnames linux-image-6.12. 2>/dev/null \
              | sed -n 's/^linux-image-\(6\.12\.[0-9]*+deb12-amd64\)-unsigned$/\1/p' | sort) \
            <(apt-cache pkgnames linux-headers-6.12. 2>/dev/null \
              | sed -n 's/^linux-headers-\(6\.12\.[0-9]*+deb12-amd64\)$/\1/p' | sort) \
            | sort -V | tail -1)
    fi
    echo "${best:-$KERNEL2_PIN}"
}

# The project's runtime, test and demo dependencies, one per line, sorted.
python_deps() {
    python3 - "$REPO/pyproject.toml" "$PY_EXCLUDE" <<'EOF'
import re, sys, tomllib
proj = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = list(proj.get("dependencies", []))
for extra in ("test", "demo"):
    deps += proj.get("optional-dependencies", {}).get(extra, [])
skip = set(sys.argv[2].split())
out = sorted({d for d in deps if re.split(r"[\[<>=!~ ;]", d, 1)[0].lower() not in skip})
print("\n".join(out))
EOF
}

KERNEL2=$(resolve_kernel2)
KERNEL_PACKAGES="linux-image-amd64 linux-headers-amd64 linux-image-$KERNEL2-unsigned linux-headers-$KERNEL2"
PYDEPS=$(python_deps)
KEY=$( { echo "$SUITE"; echo $PACKAGES $KERNEL_PACKAGES; echo "$PYDEPS"; cat "$SCRIPT"; } \
       | sha256sum | cut -c1-16)
DEST="$CACHE/rootfs-$KEY"

case "${1:-}" in
    --key) echo "$KEY"; exit 0 ;;
    --print) [ -f "$DEST/complete" ] && echo "$DEST" && exit 0; exit 1 ;;
    "") ;;
    *) die "unknown argument: $1" ;;
esac

[ -f "$DEST/complete" ] && { echo "$DEST"; exit 0; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot)"
for t in debootstrap mkfs.ext4 chroot flock; do
    command -v "$t" >/dev/null || die "$t not found (apt-get install debootstrap e2fsprogs)"
done

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
[ -f "$DEST/complete" ] && { echo "$DEST"; exit 0; }   # built while we waited

T0=$(date +%s)
WORK="$CACHE/build-$KEY"
ROOT="$WORK/root"
MOUNTED=()

unmount_all() {
    local i
    for ((i=${#MOUNTED[@]}-1; i>=0; i--)); do
        umount "${MOUNTED[$i]}" 2>/dev/null || umount -l "${MOUNTED[$i]}" 2>/dev/null || true
    done
    MOUNTED=()
}
# Never rm -rf a tree that still has something mounted under it (e.g. /dev).
safe_rm() {
    local d=$1
    [ -e "$d" ] || return 0
    if findmnt -rn -o TARGET | grep -q "^$(realpath "$d")\(/\|$\)"; then
        log "not removing $d: something is still mounted under it"; return 1
    fi
    rm -rf --one-file-system "$d"
}
cleanup() { unmount_all; safe_rm "$WORK" || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

safe_rm "$WORK"
mkdir -p "$WORK" "$CACHE/debs"

log "key $KEY; kernels: linux-image-amd64 (6.1) and $KERNEL2"
log "debootstrap $SUITE (minbase)"
t=$(date +%s)
debootstrap --variant=minbase --cache-dir="$CACHE/debs" "$SUITE" "$ROOT" "$MIRROR" \
    > "$WORK/debootstrap.log" 2>&1 || { tail -30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
log "debootstrap done in $(( $(date +%s) - t )) s"

chroot_mount() {
    mount "$@"; MOUNTED+=("${@: -1}")
}
chroot_mount -t proc proc "$ROOT/proc"
chroot_mount -t sysfs sysfs "$ROOT/sys"
chroot_mount --bind /dev "$ROOT/dev"
chroot_mount --bind /dev/pts "$ROOT/dev/pts"
chroot_mount --bind "$CACHE/debs" "$ROOT/var/cache/apt/archives"

# Sources: main, updates and security (the kernels' newest ABIs are there).
rm -f "$ROOT/etc/apt/sources.list"
cat > "$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"; chmod +x "$ROOT/usr/sbin/policy-rc.d"
cat > "$ROOT/etc/apt/apt.conf.d/90acceptrace-vm" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dpkg::Options { "--force-confold"; "--force-confdef"; };
EOF

in_root() { chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            DEBIAN_FRONTEND=noninteractive "$@"; }

log "apt-get install (packages, then kernels)"
t=$(date +%s)
{
    in_root apt-get update -q
    in_root apt-get -y -q dist-upgrade
    # shellcheck disable=SC2086
    in_root apt-get install -y -q $PACKAGES
} > "$WORK/apt.log" 2>&1 || { tail -30 "$WORK/apt.log" >&2; die "apt-get failed"; }
# initramfs for every kernel installed below: virtio disk, ext4 and 9p available.
sed -i 's/^MODULES=.*/MODULES=most/' "$ROOT/etc/initramfs-tools/initramfs.conf"
printf '%s\n' virtio_pci virtio_blk ext4 9p 9pnet_virtio >> "$ROOT/etc/initramfs-tools/modules"
# shellcheck disable=SC2086
in_root apt-get install -y -q $KERNEL_PACKAGES >> "$WORK/apt.log" 2>&1 \
    || { tail -30 "$WORK/apt.log" >&2; die "installing the kernels failed"; }
log "apt-get done in $(( $(date +%s) - t )) s"
# The deb cache keeps only what this image installed (it speeds up rebuilds).
in_root dpkg-query -W -f '${Package}_${Version}_${Architecture}.deb\n' | sed 's/:/%3a/g' \
    > "$WORK/debs.keep"
for f in "$CACHE"/debs/*.deb; do
    grep -qxF "${f##*/}" "$WORK/debs.keep" || rm -f "$f"
done

log "pip: downloading the project's Python dependencies on the host"
t=$(date +%s)
mkdir -p "$ROOT/tmp/wheels"
PLATFORMS=(--platform manylinux_2_36_x86_64)
for v in $(seq 35 -1 17); do PLATFORMS+=(--platform "manylinux_2_${v}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64
            --platform manylinux1_x86_64 --platform linux_x86_64)
mapfile -t DEPS <<<"$PYDEPS"
# The guest's python is bookworm's 3.11: fetch wheels for it whatever the host's python.
$PIP download --quiet --dest "$ROOT/tmp/wheels" --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    "${PLATFORMS[@]}" "${DEPS[@]}" > "$WORK/pip.log" 2>&1 \
    || { tail -30 "$WORK/pip.log" >&2; die "pip download failed"; }
in_root python3 -m pip install --quiet --break-system-packages --no-index \
    --find-links /tmp/wheels "${DEPS[@]}" >> "$WORK/pip.log" 2>&1 \
    || { tail -30 "$WORK/pip.log" >&2; die "pip install in the chroot failed"; }
rm -rf "$ROOT/tmp/wheels"
log "pip done in $(( $(date +%s) - t )) s"

# Every kernel has its headers where BCC looks for them.
for d in "$ROOT"/lib/modules/*; do
    d=${d#"$ROOT"}   # build is an absolute symlink: resolve it inside the root
    in_root test -e "$d/build/include/generated/autoconf.h" || die "no header tree at $d/build"
done

# The guest's PID 1: mount the shared repository and hand over to the
# tests/vm/guest-init.sh found there (so that script is not baked in here).
cat > "$ROOT/sbin/acceptrace-vm-init" <<'EOF'
#!/bin/sh
# acceptrace QEMU guest: PID 1 stub. The real init is the repository's.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
modprobe -a virtio_pci 9pnet_virtio 9p
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro src /mnt/src &&
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /results &&
exec /bin/bash /mnt/src/tests/vm/guest-init.sh
echo "acceptrace-vm-init: could not mount the 9p shares" >&2
echo o > /proc/sysrq-trigger
sleep 60
EOF
chmod 755 "$ROOT/sbin/acceptrace-vm-init"
mkdir -p "$ROOT/mnt/src" "$ROOT/results"
echo acceptrace-vm > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost acceptrace-vm\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
echo "/dev/vda / ext4 rw 0 0" > "$ROOT/etc/fstab"

unmount_all
in_root apt-get clean >/dev/null 2>&1 || true
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* \
       "$ROOT"/usr/share/locale/* "$ROOT/usr/sbin/policy-rc.d"

log "mkfs.ext4 -d"
t=$(date +%s)
mkdir -p "$WORK/out"
for k in "$ROOT"/boot/vmlinuz-*; do
    rel=${k##*/vmlinuz-}
    [ -f "$ROOT/boot/initrd.img-$rel" ] || die "no initrd for $rel"
    cp "$k" "$ROOT/boot/initrd.img-$rel" "$WORK/out/"
    echo "$rel" >> "$WORK/out/kernels"
done
used_mb=$(du -sm --apparent-size "$ROOT" | cut -f1)
size_mb=$(( used_mb * 13 / 10 + 512 ))
mkfs.ext4 -q -F -L acceptrace-vm -E root_owner=0:0 -d "$ROOT" "$WORK/out/rootfs.ext4" "${size_mb}M" \
    >&2 || die "mkfs.ext4 -d failed"
chmod 0444 "$WORK/out/rootfs.ext4"
log "mkfs done in $(( $(date +%s) - t )) s (${size_mb} MB image)"
{
    echo "key=$KEY"
    echo "built=$(date -u +%FT%TZ)"
    echo "build_seconds=$(( $(date +%s) - T0 ))"
    echo "packages="$PACKAGES $KERNEL_PACKAGES
    echo "python=$(echo "$PYDEPS" | tr '\n' ' ')"
    echo "kernels=$(tr '\n' ' ' < "$WORK/out/kernels")"
} > "$WORK/out/manifest"
touch "$WORK/out/complete"
safe_rm "$DEST"
mv "$WORK/out" "$DEST"

# Stale images (other keys) go only now that this one is complete.
for old in "$CACHE"/rootfs-* "$CACHE"/build-*; do
    [ "$old" = "$DEST" ] || [ "$old" = "$WORK" ] || { log "removing stale ${old##*/}"; safe_rm "$old" || true; }
done
log "built $DEST in $(( $(date +%s) - T0 )) s"
echo "$DEST"
