"""The structure may change; the numbers may not. Each file in tests/data/before_seam/ is the
metrics.jsonl that a command wrote before the policy pair and the model seam existed (less
its perf/* timings); the same command must write the same values today."""

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_and_read

BEFORE = Path(__file__).parent / "data" / "before_seam"
COMMANDS = {
    # kl.is_correction=false: GRPO's default before it followed TRL (README, The KL-gradient audit)
    "grpo": ["algo=grpo", "kl.target=0.05", "kl.is_correction=false", "steps=60"],
    "ppo": ["algo=ppo", "steps=30"],
    "dpo": ["algo=dpo", "steps=30"],
    "exact": ["task=exact", "algo=grpo", "schedule=fixed", "kl.beta=0.1", "kl.placement=reward",
              "estimator=k1", "steps=60"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_logged_value_equals_the_one_written_before_the_redesign(name, tmp_path):
    _, rows = run_and_read(tmp_path / name, *COMMANDS[name])
    before = [json.loads(line) for line in (BEFORE / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) == len(before)
    for row, old in zip(rows, before, strict=True):
        for key, value in old.items():
            assert key in row, f"step {old['step']}: {key} is no longer logged"
            assert math.isclose(row[key], value, rel_tol=1e-6, abs_tol=1e-12), (
                f"step {old['step']}: {key} = {row[key]!r}, before {value!r}")
