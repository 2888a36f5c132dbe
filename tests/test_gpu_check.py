"""The prepared GPU check runs end to end, on a tiny Qwen2 on CPU (the real one needs CUDA)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_script_runs_grpo_and_dpo_with_full_fine_tuning_and_lora():
    result = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--small", "--device", "cpu", "--steps", "1",
         "--warmup", "1", "--prompts", "2", "--group", "2", "--pairs", "2", "--prompt-len", "4",
         "--new-tokens", "4", "--lags", "0", "1"], cwd=REPO, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    rows = [r for r in lines if "algo" in r]
    assert [(r["algo"], r["lora"]) for r in rows] == [("grpo", False), ("grpo", True),
                                                      ("dpo", False), ("dpo", True)]
    # and the engines compared on one batch: native always, vllm where it is installed
    [engines] = [r for r in lines if r.get("check") == "engines"]
    assert engines["tokens_per_s"]["native"] > 0
    assert set(engines["tokens_per_s"]) | set(engines.get("skipped", [])) == {"native", "vllm"}
    assert all(r["step_ms"] > 0 for r in rows)
    # and the training loop synchronous against a lag of one step, per engine
    lags = {r["engine"]: r for r in lines if r.get("check") == "lag"}
    assert set(lags) == {"native", "vllm"}
    assert lags["native"]["lag 0"]["hidden"] == 0 and lags["native"]["lag 1"]["tokens_per_s"] > 0
