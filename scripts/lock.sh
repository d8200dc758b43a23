#!/usr/bin/env bash
# Refreshes requirements/lock.txt from pyproject.toml, then sets up and runs the test suite with it.
#   bash scripts/lock.sh              keep every locked version that pyproject still allows; resolve only what changed
#   bash scripts/lock.sh --upgrade    take the newest versions that pyproject allows (then read the test results!)
# Any other argument goes to `uv pip compile` (e.g. --upgrade-package transformers).
# The lock covers every extra, for Python 3.11 on Linux, with the CPU torch of requirements/pins.in; torch's
# CUDA-only requirements are left out (requirements/cuda-excludes.txt). scripts/setup.sh installs with it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/lock.txt uv
.venv/bin/python -m uv pip compile pyproject.toml requirements/pins.in --all-extras --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --excludes requirements/cuda-excludes.txt \
    --custom-compile-command "bash scripts/lock.sh" --output-file requirements/lock.txt "$@"
bash scripts/setup.sh && .venv/bin/python -m pytest -q
