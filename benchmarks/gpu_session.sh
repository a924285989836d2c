#!/usr/bin/env bash
# What needs a GPU, as one prepared run on a lent machine (the `device` tool): stx's GPU tests, the
# optimisation alone (gpu.py), the issue "Batched sweeps"' 64-run sweep (batched launcher), the batch engine
# alone, banked or not (batched_engine.py), and a single
# job's whole process. At most 9 minutes; each step has its own time limit, so one that hangs
# leaves the others their time.
#
# Here, first: fill .whl/ with stx's wheel and the wheels the GPU machine lacks, and keep .whl/ out of git
# (.git/info/exclude), as ../shared/gpu-notes.md ("Carrying stx") says. Then, with the device tool:
#     command: bash benchmarks/gpu_session.sh    carry: [".whl"]    timeout_s: 580
# Each step's full output is written to $OUT/<step>.txt; the last lines of each are printed.
set -u
out=${OUT:-/tmp/stx-gpu}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), at most ${limit} s): $*"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "   exit status $?"
  tail -n 15 "$out/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
step gpu_tests 90 python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py
step optimisation 60 python3 benchmarks/gpu.py --size 512 --steps 500 --rounds 1
step sweep_64 200 python3 benchmarks/sweep.py --device cuda --weights random --size 512 --steps 500 --runs 16 \
  --lrs 1 0.7 0.5 0.35 --rounds 1 --launchers batched
step engine 80 python3 benchmarks/batched_engine.py --device cuda --weights random --size 512 --steps 100 --runs 16 \
  --rounds 1
step whole_process 120 python3 benchmarks/whole_process.py --sizes 512 --steps 500 --rounds 1
