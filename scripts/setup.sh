#!/usr/bin/env bash
# Create .venv/ and install cifarbench with its test extra. Needs only python3 (with venv) and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "cifarbench installed in $(pwd)/.venv (activate with: source .venv/bin/activate)"
