#!/usr/bin/env bash
# Style and structure checks (configured in pyproject.toml): ruff, ruff format, mypy, and the import-linter
# contracts that keep the layers one way and the control plane free of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
.venv/bin/ruff check cifarbench tests scripts
.venv/bin/ruff format --check cifarbench tests scripts
.venv/bin/mypy
.venv/bin/lint-imports
