#!/usr/bin/env bash
# Make the side venv that runs the peer, pystiche 1.0.1, natively: pyenv's Python 3.10 with torch
# 1.12.1 and torchvision 0.13.1 (whose models still have the model_urls dicts pystiche reads; they
# were removed in torchvision 0.15). Outside the repository, never committed.
#
#   benchmarks/peer_venv.sh [TARGET_DIR]     # default: ~/.cache/stx/peer-venv
#
# Then pass its interpreter to the benchmarks: --peer-python TARGET_DIR/bin/python
# Override the interpreter with PEER_BASE_PYTHON=/path/to/python3.10.
set -euo pipefail

target="${1:-$HOME/.cache/stx/peer-venv}"
base="${PEER_BASE_PYTHON:-$HOME/.pyenv/versions/3.10.13/bin/python}"
if [[ ! -x "$base" ]]; then
    echo "peer_venv.sh: no Python 3.10 at $base; install it (pyenv install 3.10.13) or set PEER_BASE_PYTHON." >&2
    exit 1
fi
"$base" -m venv "$target"
"$target/bin/python" -m pip install --quiet --upgrade pip
# numpy<2: torch 1.12 was built against NumPy 1.x.
"$target/bin/python" -m pip install --quiet torch==1.12.1 torchvision==0.13.1 pystiche==1.0.1 "numpy<2"
"$target/bin/python" -W ignore::UserWarning -c "import pystiche, torch, torchvision; print('pystiche', pystiche.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
echo "peer venv ready: --peer-python $target/bin/python"
