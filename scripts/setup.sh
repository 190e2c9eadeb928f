#!/usr/bin/env bash
# Installs what tabby, its lab and its tests need on Debian 12 (run as root). Idempotent:
# a second run installs nothing and takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

# procps: sysctl; util-linux (essential): nsenter, mount; the rest: the daemons and clients the
# tests run for real (podman with runc, and busybox-static for its image: the CNI end-to-end test;
# containerd for `ctr run --cni`; the reference CNI plugins, chained after tabby-cni and benched
# beside it, with iptables for portmap)
APT_PACKAGES=(iproute2 procps bird2 dnsmasq dnsmasq-utils nftables etcd-server
              isc-dhcp-client dhcpcd-base ndisc6 tcpdump iputils-ping socat python3-venv python3-pip
              podman runc busybox-static containerd containernetworking-plugins iptables gobgpd
              qemu-system-x86 qemu-utils mmdebstrap  # real guests: `lab up --vm-kind qemu`, test_qemu_vm
              tayga unbound)  # NAT64 and DNS64 (pools with nat64, `lab up --nat64`)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian's postinst scripts would start these daemons system-wide; tabby starts its own.
  # A policy-rc.d the machine already has is left as it is.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# The distribution's interpreter unless $PYTHON names another: Debian's python3 is built with
# PGO and LTO and links libpython statically; measured here (2026-12-01) it starts in 12.6 ms
# against 19.2 ms for a pyenv build of 3.11 (--enable-shared), and runs tabby's code ~25% faster.
# A CNI plugin process pays the start-up on every call, and every agent pays the rest.
if [ -z "${PYTHON:-}" ] && [ -x /usr/bin/python3 ]; then
  PY=/usr/bin/python3
else
  PY=${PYTHON:-python3}
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.tabby-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi

# A second environment for OpenStack: neutron-server (with tabby's ML2 driver installed into it)
# brings its own pins of oslo.*, SQLAlchemy and eventlet, kept apart from tabby's own .venv.
NEUTRON_VERSION=29.0.0
if [ ! -x .venv-neutron/bin/python ]; then
  "$PY" -m venv .venv-neutron
fi
nstamp=.venv-neutron/.tabby-installed
if [ ! -f "$nstamp" ] || [ pyproject.toml -nt "$nstamp" ]; then
  .venv-neutron/bin/python -m pip install -q "neutron==$NEUTRON_VERSION" -e .
  touch "$nstamp"
fi
