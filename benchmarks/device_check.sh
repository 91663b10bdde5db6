#!/usr/bin/env bash
# The GPU check of issue 26 on the bare GPU machine: install the carried wheels, then run benchmarks/device_check.py
# (its docstring says what each step measures; docs/gpu.md how to read the results).
#
# Here, first (pip reaches the registry here, not there; 15 MiB of wheels, git-ignored):
#     make device-wheels                      # = .venv/bin/python -m benchmarks.device_wheels -> .device_wheels/
# Then ONE call of the device tool, leaving device time for a rerun (15 minutes a session, start-up included):
#     run(command="bash benchmarks/device_check.sh", carry=[".device_wheels"], timeout_s=540)
# The check keeps to its own budget (BUDGET_S, default 480 s: under timeout_s, so that it ends itself and writes its
# last results); each step has its own time box and the results are rewritten after every step, so a kill loses
# only the running step. $OUT brings back device_check.json, device_check.md and device_check.log (3 of the 8 files
# a call returns). Arguments are passed on, e.g. a rerun of two steps on the still warm machine:
#     run(command="bash benchmarks/device_check.sh --steps oom,training --budget-s 200", carry=[".device_wheels"],
#         timeout_s=260)
# Exit code: 0 when every step ran ok, 1 when one failed or was skipped, 2 when the set-up failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PYTHON=${PYTHON:-python3}  # the GPU machine's python3 is the one with torch
WHEELS=${DEVICE_WHEELS:-.device_wheels}
SITE=${DEVICE_SITE:-/tmp/tinysr-device-site}

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in $WHEELS: run 'make device-wheels' before the call and name $WHEELS in carry" >&2
    exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "error: the carried wheels in $WHEELS did not install" >&2; exit 2; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import diffusers, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', \
diffusers.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" \
    || { echo "error: torch or the carried diffusers does not import" >&2; exit 2; }
exec "$PYTHON" -m benchmarks.device_check --budget-s "${BUDGET_S:-480}" "$@"
