"""task=reasoning through the real command on tiny settings (a 300-item pool, a 20-step SFT
reference, 4 held-out questions × 4 samples): the reference's evaluation at the first step
and the policy's every eval.every steps, sample files whose every score is reasoning-gym's
own score_answer of that line, the same rows in W&B, GRPO, PPO and DPO (verifier-labelled
pairs) on the task, a pretrained instruct checkpoint through its chat template, the rlvr
sweep's report, and every bad setting refused in one line before training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from reasoning_gym import get_score_answer_fn
from tokenizers import Tokenizer

from tests.conftest import assert_refused_in_one_line, run_and_read, run_klsweep
from tests.hf_fixtures import save_tiny_model

PROMPTS, SAMPLES = 4, 4


def small(tmp_path) -> list[str]:
    """Tiny task settings; the reference cached in the test's own dir."""
    return ["task=reasoning", "task.train_size=300", "task.reference.steps=20",
            "task.reference.batch_size=16", f"task.cache_dir={tmp_path / 'cache'}",
            f"eval.prompts={PROMPTS}", f"eval.samples={SAMPLES}", "eval.k=[1,2,4]",
            "trainer.enable_progress_bar=false"]


GRPO = ["steps=4", "eval.every=2", "algo.prompts_per_step=2", "algo.group_size=2"]


def read_samples(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_run_evaluates_its_reference_then_its_policy_and_writes_scored_samples(tmp_path):
    run_dir = tmp_path / "run"
    result = run_klsweep(*small(tmp_path), *GRPO, "logger=wandb", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert "the reference's held-out accuracy is" in result.stderr + result.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ks = (1, 2, 4)
    reference = {f"eval/ref_{m}" for m in ("accuracy", "entropy", "format_rate")}
    policy = {f"eval/{m}" for m in ("accuracy", "entropy", "format_rate")}
    assert reference | {f"eval/ref_pass@{k}" for k in ks} <= set(rows[0])
    assert [row["step"] for row in rows if "eval/accuracy" in row] == [1, 3]
    assert not any("eval/ref_accuracy" in row for row in rows[1:])
    for row in rows:
        if "eval/accuracy" in row:
            assert policy | {f"eval/pass@{k}" for k in ks} <= set(row)
            assert row["eval/pass@1"] == pytest.approx(row["eval/accuracy"])
            assert row["eval/pass@1"] <= row["eval/pass@2"] <= row["eval/pass@4"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval/pass@4_final"] == rows[3]["eval/pass@4"]
    assert summary["eval/ref_accuracy_final"] == rows[0]["eval/ref_accuracy"]

    files = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert files == ["reference.jsonl", "step_1.jsonl", "step_3.jsonl"]
    for name, step in (("reference.jsonl", 0), ("step_3.jsonl", 3)):
        lines = read_samples(run_dir / "samples" / name)
        assert len(lines) == PROMPTS * SAMPLES
        for line in lines:
            assert set(line) == {"question", "completion", "extracted_answer", "tagged",
                                 "score", "entry"}
            assert line["question"] == line["entry"]["question"]
            # scored again by reasoning-gym itself, from the line alone
            score = get_score_answer_fn(line["entry"]["metadata"]["source_dataset"])
            assert line["score"] == score(line["extracted_answer"], line["entry"])
        accuracy = sum(line["score"] for line in lines) / len(lines)
        key = "eval/ref_accuracy" if name == "reference.jsonl" else "eval/accuracy"
        assert accuracy == pytest.approx(rows[step][key])

    # the character tokenizer is kept beside the record, and reads the task's text
    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    question = lines[0]["question"] + "\n"
    assert tokenizer.decode(tokenizer.encode(question, add_special_tokens=False).ids) == question

    # the same samples reached W&B as tables, read back by W&B's own reader
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    records = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                              str(wandb_run)], capture_output=True, text=True, check=True).stdout
    history = [json.loads(line)["history"]["item"] for line in records.splitlines()
               if '"type":"history"' in line]
    tables = {key.removesuffix("._type"): item[key.replace("._type", ".nrows")]
              for item in history for key, value in item.items()
              if key.endswith("._type") and value == "table-file"}
    assert tables == dict.fromkeys(["samples/reference", "samples/step_1", "samples/step_3"],
                                   PROMPTS * SAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("algo", [
    ["algo=ppo", "algo.prompts_per_step=2", "algo.samples_per_prompt=2", "algo.ppo_epochs=1"],
    ["algo=dpo", "algo.labels=deterministic", "algo.ties=drop", "algo.dataset_pairs=64",
     "algo.pairs_per_step=8", "algo.eval_prompts=2", "algo.eval_samples_per_prompt=2"],
])
def test_ppo_and_dpo_train_on_the_task(algo, tmp_path):
    summary, rows = run_and_read(tmp_path / "run", *small(tmp_path), *algo, "steps=2",
                                 "eval.every=2")
    assert summary["status"] == "completed"
    assert "eval/ref_accuracy" in rows[0] and "eval/accuracy" in rows[1]
    if "algo=dpo" in algo:
        # verifier-labelled pairs: a right and a wrong answer each, never a tie
        assert all(row["dpo/score_gap"] > 0 for row in rows)


@pytest.mark.slow
def test_a_pretrained_instruct_checkpoint_runs_through_its_chat_template(tmp_path):
    model = save_tiny_model(tmp_path / "llama", "llama")
    summary, rows = run_and_read(tmp_path / "run", *small(tmp_path), *GRPO, "model=hf",
                                 f"model.name={model}", "task.max_new_tokens=6",
                                 "task.format_weight=0.1")
    assert summary["status"] == "completed" and summary["lr"] == pytest.approx(1e-6)
    assert {"reward/score", "reward/format_rate", "eval/ref_format_rate"} <= set(rows[0])
    line = read_samples(tmp_path / "run" / "samples" / "reference.jsonl")[0]
    assert line["entry"]["question"] == line["question"]


@pytest.mark.slow
def test_a_from_scratch_transformers_arch_gets_the_character_tokenizer_and_sft(tmp_path):
    summary, rows = run_and_read(tmp_path / "run", *small(tmp_path), *GRPO, "model=hf",
                                 "model.arch=llama", "model.n_layer=1", "model.n_embd=32")
    assert summary["status"] == "completed" and summary["lr"] == pytest.approx(3e-4)
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    assert list((tmp_path / "cache").glob("reasoning-*.pt"))  # the SFT reference, cached


@pytest.mark.slow
def test_the_rlvr_sweep_and_its_report_draw_pass_at_k_per_beta(tmp_path):
    sweep = tmp_path / "sweep"
    # eval.k reaches 16: the preset's objectives are pass@1 and pass@16
    result = run_klsweep("-m", "sweep=rlvr", *small(tmp_path), *GRPO, "kl.beta=0,0.1",
                         "seed=0", "eval.samples=16", "eval.k=[1,4,16]", "logger=none",
                         f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = subprocess.run([sys.executable, "-m", "klsweep.report", str(sweep)],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert (sweep / "pass_at_k.png").stat().st_size > 0
    text = (sweep / "report.md").read_text()
    assert "| group | seeds | pass@1 | pass@16 | entropy | KL |" in text
    assert text.count("kl.beta=") >= 2 and "| reference |" in text


@pytest.mark.parametrize(("overrides", "message"), [
    (["task.dataset=chain_summ"], "task.dataset='chain_summ' is not a reasoning-gym dataset "
                                  "(closest: chain_sum"),
    (["task.dataset_config.max_word_len=4"], "task.dataset_config is rejected by "
                                             "spell_backward: max_word_len must be >= "
                                             "min_word_len"),
    (["eval.k=[1,32]"], "eval.k must be <= eval.samples=16"),
    (["task.dataset=composite", "task.dataset_config=null",
      "task.datasets={chain_sum: {weight: 0}, count_bits: {weight: 0}}"],
     "task.datasets has no weight left"),
    (["task.train_seed=999990"], "task.train_seed and task.eval_seed must draw from disjoint"),
])
def test_bad_settings_are_refused_in_one_line(overrides, message, tmp_path, monkeypatch,
                                              capsys):
    assert_refused_in_one_line(["task=reasoning", *overrides], message, tmp_path / "run",
                               monkeypatch, capsys)


def test_a_tokenizer_that_cannot_encode_the_task_is_refused(tmp_path, monkeypatch, capsys):
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # digits and spaces only: the default dataset's words have no token
    vocab = {"<unk>": 0, "<eos>": 1, " ": 2, **{str(d): 3 + d for d in range(10)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    model = save_tiny_model(tmp_path / "model", "llama")
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>",
                            eos_token="<eos>").save_pretrained(model)
    capsys.readouterr()  # what saving printed
    assert_refused_in_one_line(["task=reasoning", "model=hf", f"model.name={model}"],
                               "its tokenizer cannot encode", tmp_path / "run", monkeypatch,
                               capsys)
