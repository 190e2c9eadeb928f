#!/usr/bin/env bash
# The main command: installs what is missing, then builds the 3-host lab (hosts as network
# namespaces on a fabric, each with the tabby agent and BIRD; two containers per host) on the
# embedded SQLite store and prints the connectivity matrix. Extra arguments go to `tabby lab up`
# (e.g. --ipv6-only). The lab stays up to explore; `.venv/bin/tabby lab down` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/tabby lab up "$@"
.venv/bin/tabby lab check
echo
echo "explore: ip netns list; .venv/bin/tabby --store sqlite:///var/lib/tabby/lab/tbl/store.db status"
echo "remove:  .venv/bin/tabby lab down"
