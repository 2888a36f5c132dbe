"""The real command on real transformers models: a tiny GPT-2 and a tiny Llama saved with
save_pretrained into a temporary directory and loaded through ``model.name=<dir>``, on the
text task; and the HF architectures on the exact task, against the closed-form optimum."""

import json
import math

import pytest

from tests.conftest import run_and_read
from tests.hf_fixtures import save_tiny_model, write_prompt_file

PROMPTS = ["The movie was", "I think this food is", "My day was", "The weather today is",
           "This book made me", "Our trip to the sea was"]
TEXT_RUN = ["task=text", "task.reward=sentiment", "task.max_new_tokens=8", "steps=3",
            "checkpoint.every=2", "trainer.enable_progress_bar=false"]
SMALL = {"grpo": ["algo.prompts_per_step=2", "algo.group_size=2"],
         "ppo": ["algo.prompts_per_step=2", "algo.samples_per_prompt=2"],
         "dpo": ["algo.pairs_per_step=2", "algo.dataset_pairs=4", "algo.eval_prompts=2",
                 "algo.eval_samples_per_prompt=2"]}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompt_file(tmp_path_factory.mktemp("data"), PROMPTS)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {arch: save_tiny_model(tmp_path_factory.mktemp(arch), arch)
            for arch in ("gpt2", "llama")}


# every algorithm on Llama; GPT-2 (learned positions, Conv1D layers) with GRPO
@pytest.mark.slow
@pytest.mark.parametrize("arch, algo", [("llama", "grpo"), ("llama", "ppo"), ("llama", "dpo"),
                                        ("gpt2", "grpo")])
def test_a_saved_transformers_model_trains_on_text_prompts_with_a_sentiment_reward(
        arch, algo, model_dirs, prompt_file, tmp_path):
    summary, rows = run_and_read(tmp_path, f"algo={algo}", "model=hf",
                                 f"model.name={model_dirs[arch]}", f"task.prompts={prompt_file}",
                                 *TEXT_RUN, *SMALL[algo])
    assert summary["status"] == "completed" and summary["steps_done"] == 3
    for row in rows:
        for key in ("kl/mean", "kl/k1", "kl/k3", "kl/seq", "kl/beta", "reward/mean"):
            assert math.isfinite(row[key]), key
        assert 0.0 <= row["reward/mean"] <= 1.0


@pytest.mark.slow
def test_a_lora_run_leaves_its_adapter_for_peft_to_load(model_dirs, prompt_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary, _ = run_and_read(tmp_path, "algo=grpo", "model=hf",
                              f"model.name={model_dirs['llama']}", f"task.prompts={prompt_file}",
                              "model.lora={r: 4, alpha: 8, dropout: 0.0, "
                              "target_modules: [q_proj, v_proj]}", *TEXT_RUN, *SMALL["grpo"],
                              "task.reward=length")  # rewards that differ: a gradient to take
    assert summary["status"] == "completed"
    base = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    trained = {name for name, _ in loaded.named_parameters() if "lora_" in name}
    assert trained and all(".q_proj." in n or ".v_proj." in n for n in trained)
    # LoRA's B starts at zero: a saved B that is not is the trained adapter
    assert any(p.abs().sum() > 0 for n, p in loaded.named_parameters() if "lora_B" in n)


@pytest.mark.slow
def test_dpo_trains_on_a_preference_file_in_trl_s_format(tmp_path, prompt_file):
    model_dir = save_tiny_model(tmp_path / "model", "llama")
    preferences = tmp_path / "pairs.jsonl"
    preferences.write_text("".join(
        json.dumps({"prompt": p, "chosen": " wonderful and happy", "rejected": " awful"}) + "\n"
        for p in PROMPTS))
    summary, rows = run_and_read(tmp_path / "run", "algo=dpo", "model=hf",
                                 f"model.name={model_dir}", f"task.prompts={prompt_file}",
                                 f"task.preferences={preferences}", "optim.lr=1e-3",
                                 *TEXT_RUN, *SMALL["dpo"])
    assert summary["status"] == "completed"
    assert all("dpo/score_gap" not in row for row in rows)  # file pairs carry no task reward
    assert rows[-1]["dpo/margin"] > rows[0]["dpo/margin"]   # chosen pulled above rejected


@pytest.mark.slow
@pytest.mark.parametrize("algo, overrides", [
    ("grpo", ["kl.placement=reward", "estimator=k1"]),
    ("ppo", []),  # its defaults: k1 in the reward
])
def test_the_hf_path_reaches_the_closed_form_optimum_on_the_exact_task(algo, overrides,
                                                                       tmp_path):
    """The exact task's done-when configurations (docs/research/exact-task.md), on a Llama
    built by the task."""
    summary, _ = run_and_read(tmp_path, "task=exact", "model=hf", "model.arch=llama",
                              f"algo={algo}", "schedule=fixed", "kl.beta=0.1", "steps=200",
                              *overrides)
    assert summary["status"] == "completed"
    assert summary["exact/improvement_left_final"] <= 0.05


def raising_reward(prompts, completions, **row_fields):
    raise ValueError("the scorer is down")


@pytest.mark.slow
def test_a_reward_that_raises_ends_the_run_as_failed_with_its_reason_in_one_line(
        tmp_path, prompt_file):
    from tests.conftest import run_klsweep

    model_dir = save_tiny_model(tmp_path / "model", "gpt2")
    run_dir = tmp_path / "run"
    result = run_klsweep("model=hf", f"model.name={model_dir}", f"task.prompts={prompt_file}",
                         *TEXT_RUN, *SMALL["grpo"], "logger=none", f"hydra.run.dir={run_dir}",
                         "task.reward={_target_: tests.test_hf_end_to_end.raising_reward}")
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "the scorer is down" in summary["reason"]
    assert "\n" not in summary["reason"]
