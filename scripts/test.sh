#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest, e.g. -m "not slurm"; the 25 slowest tests
# are listed at the end (a --durations=N given here replaces that).
# Tests marked `slurm` need the local cluster (bash slurm/cluster.sh up) and are skipped without it; the browser
# tests of report.html (tests/test_report_html.py) need Chromium, found as tests/test_report_html.py finds it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  echo "note: no chromium on the PATH, so the browser tests of report.html are skipped;" \
    "install it with: apt-get install chromium (Debian, as root)" >&2
fi
exec .venv/bin/python -m pytest -p no:cacheprovider --durations=25 "$@"
