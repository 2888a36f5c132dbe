#!/usr/bin/env bash
# The throughput table of docs/research/off-policy-kl.md: the GRPO training loop synchronous
# (rollout.lag=0, on 1 and on 2 threads) against rollout.lag=1 and 2 (trainer and engine one
# thread each), each measurement in a process of its own (python -m klsweep.bench --lag), on
#   1. the default GRPO workload (the tiny GPT of DESIGN §11, native engine),
#   2. the tests' 2-layer Llama (/work/models/tiny-llama), native and vLLM,
#   3. SmolLM2-135M-Instruct (/work/models/smollm2-135m-instruct), native and vLLM.
# Run it on an idle machine (each table records the load average before each measurement).
#
# Usage: scripts/lag_throughput.sh VLLM_PYTHON OUT_DIR [ROUNDS]
#   VLLM_PYTHON: the python of an environment with vLLM (scripts/vllm_cpu_env.sh DIR builds one)
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 VLLM_PYTHON OUT_DIR [ROUNDS]" >&2
    exit 2
fi
python=$1
out=$2
rounds=${3:-3}
mkdir -p "$out"
llama=${TINY_LLAMA:-/work/models/tiny-llama}
smollm=${SMOLLM2:-/work/models/smollm2-135m-instruct}
bench=("$python" -m klsweep.bench --lag 0 1 2 --sync-threads 2)
# 8 prompts x 4 completions x 32 new tokens; full fine-tuning at a pretrained model's rate
hf=(--prompt-len 16 --new-tokens 32 algo.prompts_per_step=8 algo.group_size=4 optim.lr=1e-6)

"${bench[@]}" --rounds "$rounds" > "$out/grpo-default.md"
for engine in native vllm; do
    "${bench[@]}" --rounds "$rounds" "${hf[@]}" model=hf "model.name=$llama" \
        "rollout.engine=$engine" rollout.kv_cache_gib=0.25 > "$out/tiny-llama-$engine.md"
done
for engine in native vllm; do  # about 25 s a step on 2 cores: one round of 3 steps
    "${bench[@]}" --rounds 1 --steps 3 --warmup 1 "${hf[@]}" model=hf "model.name=$smollm" \
        "rollout.engine=$engine" rollout.kv_cache_gib=1 > "$out/smollm2-$engine.md"
done
cat "$out"/*.md
