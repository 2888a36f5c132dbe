"""The structure may change; the numbers may not. Each file in tests/data/before_seam/<cpu>/ is
the metrics.jsonl that a command wrote before the policy pair and the model seam existed (less
its perf/* timings), on that kind of CPU; the same command must write the same values today.

The numbers are kept per kind of CPU because float32 kernels round differently from one
processor to another (MKL and ATen pick their code path by vendor and instruction set): the
reference model pretrained on an AMD EPYC differs from the one pretrained on an Intel Xeon in
the sixth digit from its first step on, and training carries that on. A CPU kind with no
recorded numbers is skipped and says how to record them from the pre-seam commit
(scripts/record_before_seam.py), which checks the current code against the old code on it."""

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import run_and_read

BEFORE = Path(__file__).parent / "data" / "before_seam"
# the last commit before the policy pair and the model seam (a692530)
BEFORE_COMMIT = "a692530^"
COMMANDS = {
    # kl.is_correction=false: GRPO's default before it followed TRL
    # (docs/research/gradient-audit.md)
    "grpo": ["algo=grpo", "kl.target=0.05", "kl.is_correction=false", "steps=60"],
    # one sample per prompt (64 prompts, PPO's 64 rollouts): PPO's critic reads the hidden
    # states of the pass that scores the rollout, the same numbers as the old second pass
    # only where that pass shares no prompt; with shared prompts they differ by float32
    # rounding (<= 1.3e-6, tests/test_model.py), enough to flip a value-clip decision
    "ppo": ["algo=ppo", "algo.samples_per_prompt=1", "algo.prompts_per_step=64", "steps=30"],
    "dpo": ["algo=dpo", "steps=30"],
    "exact": ["task=exact", "algo=grpo", "schedule=fixed", "kl.beta=0.1", "kl.placement=reward",
              "estimator=k1", "steps=60"],
}


def cpu_kind() -> str:
    """The processor's vendor and the instruction set ATen dispatches to (AuthenticAMD-AVX512)."""
    vendor = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_logged_value_equals_the_one_written_before_the_redesign(name, tmp_path):
    recorded = BEFORE / cpu_kind() / f"{name}.jsonl"
    if not recorded.exists():
        pytest.skip(f"no numbers recorded on a {cpu_kind()} CPU; record them from {BEFORE_COMMIT}"
                    " with python scripts/record_before_seam.py")
    _, rows = run_and_read(tmp_path / name, *COMMANDS[name])
    before = [json.loads(line) for line in recorded.read_text().splitlines()]
    assert len(rows) == len(before)
    for row, old in zip(rows, before, strict=True):
        for key, value in old.items():
            assert key in row, f"step {old['step']}: {key} is no longer logged"
            assert math.isclose(row[key], value, rel_tol=1e-6, abs_tol=1e-12), (
                f"step {old['step']}: {key} = {row[key]!r}, before {value!r}")
