#!/usr/bin/env bash
# The test command: installs what is missing, lints, then runs every test (as root: the tests
# build network namespaces and start real daemons). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest -q "$@"
