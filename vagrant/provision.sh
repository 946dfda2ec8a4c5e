#!/bin/sh
# Provisions the acceptrace lab VM (vagrant/Vagrantfile), as root in the guest: the
# project's own `make setup` -- the same command as on a fresh host -- then acceptrace
# on root's PATH.  The repository is already synced to /acceptrace.
set -eu
export DEBIAN_FRONTEND=noninteractive
if ! command -v make >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq make
fi
cd /acceptrace
make setup
ln -sf /acceptrace/.venv/bin/acceptrace /usr/local/bin/acceptrace
echo "acceptrace lab ready:  vagrant ssh -c 'sudo acceptrace lab run all'"
