# acceptrace: set-up, demo and tests on a Debian/Ubuntu machine (run as root: sudo make ...).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.acceptrace-setup
PYTEST_ARGS ?=

# Debian/Ubuntu packages: BCC's Python module (for Debian's /usr/bin/python3),
# a kernel header tree for BCC's compiler, and what the tests and tools use
# (prometheus: the server and promtool the exporter's tests scrape and check with;
# prometheus-node-exporter: its textfile collector reads the exporter's textfile;
# vagrant, vagrant-libvirt: `vagrant validate` of the lab's VM, tests/test_vagrant.py).
APT_PACKAGES := python3-bpfcc bpfcc-tools python3-venv python3-pip iproute2 bpftool \
	gcc libc6-dev make binutils xz-utils procps tmux chromium prometheus prometheus-node-exporter \
	nginx-light nodejs vagrant vagrant-libvirt
# The QEMU guest suite (tests/test_vm.py, docs/vm.md): TCG emulator, debootstrap
# for the guest root filesystem, mkfs.ext4 -d for its image.
VM_APT_PACKAGES := qemu-system-x86 debootstrap e2fsprogs
# make test-lab (docs/lab.md): the lab's Vagrant VM booted for real, under libvirt
# (started by hand inside a network namespace: no systemd needed) with QEMU.
LAB_APT_PACKAGES := $(VM_APT_PACKAGES) qemu-utils libvirt-daemon-system libvirt-daemon-driver-qemu \
	libvirt-clients dnsmasq-base rsync vagrant vagrant-libvirt

.PHONY: setup system-packages vm-packages lab-packages demo test test-host test-unit test-vm \
	test-lab lint bench clean print-apt-packages

setup: system-packages $(STAMP)

$(STAMP): pyproject.toml Makefile | system-packages
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,demo]'
	@$(PY) -c 'import bcc' || { echo "make setup: BCC's module is not visible from $(VENV)" >&2; exit 1; }
	@touch $@

# apt-get only when something is missing, so repeated runs are quick.
system-packages:
	@command -v apt-get >/dev/null || { echo "make setup: needs apt-get (Debian/Ubuntu)" >&2; exit 1; }
	@[ "$$(id -u)" = 0 ] || { echo "make setup: installing packages needs root: sudo make setup" >&2; exit 1; }
	@set -e; \
	hdr=""; rel=$$(uname -r); arch=$$(dpkg --print-architecture); \
	if [ ! -d /lib/modules/$$rel/build/include ] && ! ls -d /usr/src/linux-headers-* >/dev/null 2>&1; then \
	  hdr=linux-headers-$$rel; \
	fi; \
	missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing$$hdr" ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq; \
	  if [ -n "$$hdr" ] && ! apt-get install -y -qq $$hdr >/dev/null 2>&1; then \
	    echo "make setup: no $$hdr in the archive; installing a generic header tree (acceptrace takes offsets from BTF)"; \
	    apt-get install -y -qq linux-headers-$$arch >/dev/null 2>&1 || apt-get install -y -qq linux-headers-generic; \
	  fi; \
	  if [ -n "$$missing" ]; then apt-get install -y -qq $$missing; fi; \
	fi

vm-packages:
	@[ "$$(id -u)" = 0 ] || { echo "make test-vm: needs root: sudo make test-vm" >&2; exit 1; }
	@set -e; missing=""; \
	for p in $(VM_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq; \
	  apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lab-packages:
	@[ "$$(id -u)" = 0 ] || { echo "make test-lab: needs root: sudo make test-lab" >&2; exit 1; }
	@set -e; missing=""; \
	for p in $(LAB_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq; \
	  apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: setup
	$(VENV)/bin/acceptrace demo

# What make setup installs (the lab's local box bakes them in: tests/labvm/build-box.sh).
print-apt-packages:
	@echo $(APT_PACKAGES)

# ruff, then mypy over what [tool.mypy] in pyproject.toml lists (tracer/, bench/,
# the QEMU harness).
lint: setup
	$(VENV)/bin/ruff check tracer tests bench
	$(VENV)/bin/mypy

# The host suite, then the QEMU guest suite (both run; either failing fails).
test: setup lint vm-packages
	@rc=0; \
	echo "$(PY) -m pytest -m \"not vm\" $(PYTEST_ARGS)"; \
	$(PY) -m pytest -m "not vm" $(PYTEST_ARGS) || rc=$$?; \
	echo "$(PY) -m pytest -m vm $(PYTEST_ARGS)"; \
	$(PY) -m pytest -m vm $(PYTEST_ARGS) || { s=$$?; [ $$rc != 0 ] || rc=$$s; }; \
	exit $$rc

# Only the host suite (about 11 min): no QEMU.
test-host: setup lint
	$(PY) -m pytest -m "not vm" $(PYTEST_ARGS)

# Pure unit tests, runnable as any user in under a minute: no root, no BPF, no
# QEMU (after one sudo make setup; nothing is written to the checkout).
test-unit:
	@test -x $(PY) || { echo "make test-unit: run sudo make setup once first" >&2; exit 1; }
	$(PY) -m pytest -p no:cacheprovider -m "not root and not vm" $(PYTEST_ARGS)

# Only the guest suite: the root tests inside QEMU guests booting Debian's
# 6.1 and 6.12 kernels, once per backend (docs/vm.md).
test-vm: setup vm-packages
	$(PY) -m pytest -m vm $(PYTEST_ARGS)

# The lab's Vagrant VM booted for real (a local Debian trixie box, libvirt with QEMU/TCG
# inside a network namespace) and `acceptrace lab run all` inside it on the fentry
# backend; not part of make test (docs/lab.md records a run's result and timings).
test-lab: setup lab-packages
	tests/labvm/run.sh

bench: setup
	$(PY) bench/accept_rate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
