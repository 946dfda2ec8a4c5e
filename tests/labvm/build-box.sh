#!/usr/bin/env bash
# Builds (once) a Vagrant box for libvirt from a Debian trixie root filesystem, for
# `make test-lab` (docs/lab.md): the lab's VM booted for real, offline.
#
#   tests/labvm/build-box.sh           build if needed; print the box file
#   tests/labvm/build-box.sh --key     print the cache key only
#
# The guest reaches no package archive (its network exists only inside a network
# namespace), so what vagrant/provision.sh's `make setup` installs is baked in: every
# package of the Makefile's APT_PACKAGES, the trixie kernel's headers, and the
# project's Python dependencies as wheels with /etc/pip.conf pointing pip at them.
# provision.sh itself is the one a user's box runs.  Besides: systemd, sshd, DHCP
# (systemd-networkd), rsync, sudo and the user vagrant with Vagrant's public insecure
# key (replaced by vagrant up).  The disk is one ext4 filesystem (no partition table,
# no boot loader): the box's own Vagrantfile boots the kernel and initrd shipped in the
# box directly (libvirt's <kernel>, <initrd>, <cmdline>).
#
# Cache: $ACCEPTRACE_LAB_CACHE (default /var/cache/acceptrace-lab)/box-<key>/ with
# <key> a hash of this script, the package list and the Python dependencies.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SCRIPT="$HERE/$(basename "${BASH_SOURCE[0]}")"
CACHE=${ACCEPTRACE_LAB_CACHE:-/var/cache/acceptrace-lab}
MIRROR=${ACCEPTRACE_VM_MIRROR:-http://deb.debian.org/debian}
SUITE=trixie
VAGRANT_PUB=${VAGRANT_PUB:-$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
                              /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub \
                              2>/dev/null | head -1 || true)}

BASE="systemd-sysv openssh-server sudo rsync ca-certificates iproute2 procps
kmod initramfs-tools zstd python3 python3-pip python3-venv linux-image-amd64 linux-headers-amd64"
APT=$(make -s -C "$REPO" print-apt-packages)

log() { printf '[build-box %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

python_deps() {
    python3 - "$REPO/pyproject.toml" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:
    import tomli as tomllib
proj = tomllib.load(open(sys.argv[1], "rb"))
deps = list(proj["project"].get("dependencies", []))
for extra in ("test", "demo"):
    deps += proj["project"].get("optional-dependencies", {}).get(extra, [])
deps += proj["build-system"]["requires"]       # pip install -e builds with these
print("\n".join(sorted(set(deps))))
EOF
}

PYDEPS=$(python_deps)
KEY=$( { echo "$SUITE"; echo $BASE $APT; echo "$PYDEPS"; cat "$SCRIPT"; } | sha256sum | cut -c1-16)
DEST="$CACHE/box-$KEY"
case "${1:-}" in
    --key) echo "$KEY"; exit 0 ;;
    "") ;;
    *) die "unknown argument: $1" ;;
esac
[ -f "$DEST/complete" ] && { echo "$DEST/acceptrace-lab.box"; exit 0; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot)"
for t in debootstrap mkfs.ext4 qemu-img chroot flock; do
    command -v "$t" >/dev/null || die "$t not found (make test-lab installs it)"
done
[ -n "$VAGRANT_PUB" ] && [ -f "$VAGRANT_PUB" ] || die "Vagrant's public insecure key not found"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
[ -f "$DEST/complete" ] && { echo "$DEST/acceptrace-lab.box"; exit 0; }

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
LOGS="$CACHE/build-logs"   # kept: the last build's, failed or not
rm -rf "$LOGS"
mkdir -p "$WORK" "$CACHE/debs" "$LOGS"

log "key $KEY: debootstrap $SUITE (minbase)"
t=$(date +%s)
debootstrap --variant=minbase --cache-dir="$CACHE/debs" "$SUITE" "$ROOT" "$MIRROR" \
    > "$LOGS/debootstrap.log" 2>&1 || { tail -30 "$LOGS/debootstrap.log" >&2; die "debootstrap failed"; }
log "debootstrap done in $(( $(date +%s) - t )) s"

chroot_mount() { mount "$@"; MOUNTED+=("${@: -1}"); }
chroot_mount -t proc proc "$ROOT/proc"
chroot_mount -t sysfs sysfs "$ROOT/sys"
chroot_mount --bind /dev "$ROOT/dev"
chroot_mount --bind /dev/pts "$ROOT/dev/pts"
chroot_mount --bind "$CACHE/debs" "$ROOT/var/cache/apt/archives"

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
cat > "$ROOT/etc/apt/apt.conf.d/90acceptrace-lab" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dpkg::Options { "--force-confold"; "--force-confdef"; };
EOF
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"

in_root() { chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            DEBIAN_FRONTEND=noninteractive "$@"; }

log "apt-get install: the guest's base, then make setup's packages"
t=$(date +%s)
sed_initramfs() {
    sed -i 's/^MODULES=.*/MODULES=most/' "$ROOT/etc/initramfs-tools/initramfs.conf"
    printf '%s\n' virtio_pci virtio_blk virtio_net ext4 >> "$ROOT/etc/initramfs-tools/modules"
}
apt_step() {
    "$@" >> "$LOGS/apt.log" 2>&1 || { tail -30 "$LOGS/apt.log" >&2; die "failed: ${*:2}"; }
}
apt_step in_root apt-get update -q
apt_step in_root apt-get -y -q dist-upgrade
apt_step in_root apt-get install -y -q initramfs-tools
sed_initramfs
# shellcheck disable=SC2086
apt_step in_root apt-get install -y -q $BASE
# shellcheck disable=SC2086
apt_step in_root apt-get install -y -q $APT
log "apt-get done in $(( $(date +%s) - t )) s"
in_root dpkg-query -W -f '${Package}_${Version}_${Architecture}.deb\n' | sed 's/:/%3a/g' \
    > "$WORK/debs.keep"
for f in "$CACHE"/debs/*.deb; do
    grep -qxF "${f##*/}" "$WORK/debs.keep" || rm -f "$f"
done

log "pip download (the guest's own python and pip, in the chroot)"
t=$(date +%s)
mapfile -t DEPS <<<"$PYDEPS"
mkdir -p "$ROOT/var/cache/acceptrace-wheels"
# The host's CA bundle: where the index is reached through a proxy with its own CA,
# the host trusts it and the fresh root filesystem does not.
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/tmp/host-ca.crt"
in_root python3 -m pip download --quiet --cert /tmp/host-ca.crt \
    --dest /var/cache/acceptrace-wheels --only-binary=:all: "${DEPS[@]}" pip \
    > "$LOGS/pip.log" 2>&1 || { tail -30 "$LOGS/pip.log" >&2; die "pip download failed"; }
rm -f "$ROOT/tmp/host-ca.crt"
cat > "$ROOT/etc/pip.conf" <<'EOF'
# The lab box reaches no package index: the project's dependencies are here.
[global]
no-index = true
find-links = /var/cache/acceptrace-wheels
EOF
log "pip done in $(( $(date +%s) - t )) s ($(ls "$ROOT/var/cache/acceptrace-wheels" | wc -l) wheels)"

for d in "$ROOT"/lib/modules/*; do
    d=${d#"$ROOT"}
    in_root test -e "$d/build/include/generated/autoconf.h" || die "no header tree at $d/build"
done

log "the guest's accounts, ssh, network"
in_root useradd -m -s /bin/bash vagrant
echo 'vagrant:vagrant' | in_root chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$ROOT/etc/sudoers.d/vagrant"
chmod 0440 "$ROOT/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "$ROOT/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$VAGRANT_PUB" "$ROOT/home/vagrant/.ssh/authorized_keys"
printf 'UseDNS no\n' > "$ROOT/etc/ssh/sshd_config.d/acceptrace-lab.conf"
cat > "$ROOT/etc/systemd/network/20-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
in_root systemctl enable systemd-networkd ssh >/dev/null 2>&1 || die "systemctl enable failed"
echo acceptrace-lab > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost acceptrace-lab\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > "$ROOT/etc/hosts"
echo "/dev/vda / ext4 defaults 0 1" > "$ROOT/etc/fstab"
: > "$ROOT/etc/machine-id"    # a fresh one at first boot
rm -f "$ROOT/etc/ssh/ssh_host_"*   # and fresh host keys
cat > "$ROOT/etc/systemd/system/ssh-hostkeys.service" <<'EOF'
[Unit]
Description=SSH host keys of this machine
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable ssh-hostkeys >/dev/null 2>&1

unmount_all
in_root apt-get clean >/dev/null 2>&1 || true
rm -f "$ROOT/etc/resolv.conf" "$ROOT/usr/sbin/policy-rc.d"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/*

log "disk image and box"
t=$(date +%s)
OUT="$WORK/out"
mkdir -p "$OUT"
rel=$(ls "$ROOT"/boot/vmlinuz-* | head -1); rel=${rel##*/vmlinuz-}
cp "$ROOT/boot/vmlinuz-$rel" "$OUT/vmlinuz"
cp "$ROOT/boot/initrd.img-$rel" "$OUT/initrd.img"
used_mb=$(du -sm --apparent-size "$ROOT" | cut -f1)
size_gb=$(( (used_mb * 13 / 10 + 4096 + 1023) / 1024 ))   # room for the venv and the lab
mkfs.ext4 -q -F -L acceptrace-lab -E root_owner=0:0 -d "$ROOT" "$WORK/root.ext4" "${size_gb}G" \
    >&2 || die "mkfs.ext4 -d failed"
qemu-img convert -O qcow2 "$WORK/root.ext4" "$OUT/box.img"
rm -f "$WORK/root.ext4"
cat > "$OUT/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $size_gb}
EOF
cat > "$OUT/Vagrantfile" <<EOF
# The acceptrace lab's local box (tests/labvm/build-box.sh): Debian trixie, kernel $rel.
# One ext4 filesystem, no boot loader: libvirt boots this box's kernel directly.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 mitigations=off"
  end
end
EOF
tar -C "$OUT" -czf "$WORK/acceptrace-lab.box" metadata.json Vagrantfile box.img vmlinuz initrd.img
mkdir -p "$DEST"
mv "$WORK/acceptrace-lab.box" "$DEST/"
{
    echo "key=$KEY"
    echo "kernel=$rel"
    echo "built=$(date -u +%FT%TZ)"
    echo "build_seconds=$(( $(date +%s) - T0 ))"
    echo "disk_gb=$size_gb"
} > "$DEST/manifest"
touch "$DEST/complete"
log "box done in $(( $(date +%s) - T0 )) s: $DEST/acceptrace-lab.box"
for old in "$CACHE"/box-*; do
    [ "$old" = "$DEST" ] || rm -rf "$old"
done
echo "$DEST/acceptrace-lab.box"
