# Sourced by scripts/demo and scripts/test: create or reuse .venv and install the project into it.
# torch and torchvision are pinned to the builds on this machine's disk (any other version downloads GBs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
# Re-install only when pyproject.toml changed since the last successful install.
STAMP="$VENV/.ckpt-dynamics-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    echo "[setup] installing torch==2.14.1 torchvision==0.29.1 and the project (a few minutes the first time)"
    LOG="$VENV/pip-install.log"
    # pip's output goes to a log (this machine's package mirrors print many harmless warnings); shown on failure
    if ! { "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" &&
           "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]" "torch==2.14.1" "torchvision==0.29.1"; } \
         >"$LOG" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$LOG" >&2
        if grep -q "No space left on device" "$LOG"; then
            # torch 2.14.1 on x86_64 is the CUDA build: the venv takes about 6.5 GB
            echo "[setup] the disk is full ($(df -h --output=avail "$VENV" | tail -1 | tr -d ' ') free at $VENV); the venv needs about 6.5 GB" >&2
        fi
        echo "[setup] installation failed; full log: $LOG" >&2
        exit 1
    fi
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# Tests and demo are CPU-bound on small models: one BLAS thread per process avoids oversubscription
# when dask runs several worker processes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false
