#!/usr/bin/env bash
# The CLI alone: installs what is missing, then applies, lists and rejects resources on a
# scratch SQLite store.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
work=$(mktemp -d /tmp/tabby-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export TABBY_STORE="sqlite://$work/tabby.db"
tabby() { .venv/bin/tabby "$@"; }
echo "== tabby apply -f examples/quickstart.yaml   (store: $TABBY_STORE)"
tabby apply -f examples/quickstart.yaml
for kind in hosts ippools endpoints policies bgppeers; do
  echo; echo "== tabby get $kind"; tabby get "$kind"
done
echo; echo "== a bad endpoint is refused, naming the field, and nothing is written:"
if tabby apply -f examples/bad-endpoint.yaml; then echo "UNEXPECTED: accepted"; exit 1; fi
echo; echo "demo finished"
