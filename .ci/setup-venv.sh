#!/usr/bin/env bash
# Create ./.venv with torch + artdist installed (idempotent: reinstalls only when pyproject changes).
# torch/torchvision are pinned to the wheels this project is tested with; an unpinned torch pulls GBs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.artdist-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q "torch==${ARTDIST_TORCH:-2.14.1}" "torchvision==${ARTDIST_TORCHVISION:-0.29.1}" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import torch, torchvision, webdataset, submitit, artdist" \
        || { echo "setup-venv: installation failed (see pip output above)" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
version=$(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')
echo "setup-venv: .venv ready ($version); use it with: source .venv/bin/activate (or run .venv/bin/artdist)"
