"""The text task: prompts from every file form through ``datasets``, tokenised once (chat
template, left truncation, left padding with the row ids), rewards on decoded text with the
row fields, DPO preference files as a Rollout, and the checks that fail before training."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset, DatasetDict
from omegaconf import OmegaConf

from klsweep.config import CONF_DIR, ConfigError, choice_config, compose_and_validate
from klsweep.errors import RunFailed
from klsweep.rollout import Rollout
from klsweep.schema import check_node
from klsweep.tasks.text import TextConfig, TextTask, check_text_task
from tests.hf_fixtures import build_tokenizer

HERE = __name__
ROWS = [{"prompt": "The movie was", "answer": 1},
        {"prompt": "What is 2 + 3?", "answer": 5},
        {"prompt": "Tell me a story about a dog.", "answer": 7}]
PROMPTS = [row["prompt"] for row in ROWS]
SEEN: list[dict] = []


def recording_reward(prompts, completions, **row_fields):
    """Remembers its call; scores each completion by its length in characters."""
    SEEN.append({"prompts": prompts, "completions": completions, **row_fields})
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write(rows: list[dict], path: Path) -> str:
    """``rows`` saved as the suffix of ``path`` says (a directory: save_to_disk)."""
    data = Dataset.from_list(rows)
    if path.suffix == ".txt":
        path.write_text("\n\n".join(row["prompt"] for row in rows) + "\n")
    elif path.suffix in (".jsonl", ".csv", ".parquet"):
        getattr(data, {".jsonl": "to_json", ".csv": "to_csv", ".parquet": "to_parquet"}
                [path.suffix])(str(path))
    else:
        data.save_to_disk(str(path))
    return str(path)


def make_task(tokenizer, prompts: str, **overrides) -> TextTask:
    overrides.setdefault("reward", {"_target_": f"{HERE}.recording_reward"})
    return TextTask(choice_config("task", "text", prompts=prompts, **overrides), tokenizer)


def _defaults() -> dict:
    """conf/task/text.yaml's values."""
    return dataclasses.asdict(choice_config("task", "text"))


@pytest.fixture
def prompt_file(tmp_path) -> str:
    return write(ROWS, tmp_path / "prompts.jsonl")


@pytest.mark.parametrize("name", ["p.jsonl", "p.csv", "p.parquet", "saved"])
def test_prompts_and_their_row_fields_load_from_each_file_form(tokenizer, tmp_path, name):
    task = make_task(tokenizer, write(ROWS, tmp_path / name))
    assert task.texts == PROMPTS
    assert task.row_fields == {"answer": [1, 5, 7]}


def test_a_text_file_gives_one_prompt_per_line_and_skips_blank_lines(tokenizer, tmp_path):
    task = make_task(tokenizer, write(ROWS, tmp_path / "p.txt"), reward="sentiment")
    assert task.texts == PROMPTS and task.row_fields == {}


def test_a_saved_dataset_dict_is_read_at_task_split(tokenizer, tmp_path):
    path = tmp_path / "dict"
    DatasetDict({"train": Dataset.from_list(ROWS[:1]),
                 "test": Dataset.from_list(ROWS[1:])}).save_to_disk(str(path))
    assert make_task(tokenizer, str(path), split="test").texts == PROMPTS[1:]


def test_prompts_are_tokenised_once_left_padded_with_eos_when_there_is_no_pad(tokenizer,
                                                                             prompt_file):
    assert tokenizer.pad_token_id is None
    task = make_task(tokenizer, prompt_file)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert task.prompt_len == max(map(len, ids))
    assert task.vocab_size == len(tokenizer) and task.eos_id == tokenizer.eos_token_id
    for row, expected in enumerate(ids):
        pad = task.prompt_len - len(expected)
        assert task.prompt_tokens[row, pad:].tolist() == expected
        assert task.prompt_tokens[row, :pad].tolist() == [tokenizer.eos_token_id] * pad
        assert task.prompt_mask[row].tolist() == [False] * pad + [True] * len(expected)


def test_sample_prompts_draws_rows_with_the_generator_and_returns_their_ids(tokenizer,
                                                                           prompt_file):
    task = make_task(tokenizer, prompt_file)
    prompts = task.sample_prompts(16, torch.Generator().manual_seed(0))
    again = task.sample_prompts(16, torch.Generator().manual_seed(0))
    assert torch.equal(prompts.index, again.index) and set(prompts.index.tolist()) == {0, 1, 2}
    assert prompts.tokens.shape == prompts.mask.shape == (16, task.prompt_len)
    assert torch.equal(prompts.tokens, task.prompt_tokens[prompts.index])
    assert torch.equal(prompts.mask, task.prompt_mask[prompts.index])


def test_long_prompts_keep_their_last_tokens(tokenizer, prompt_file):
    task = make_task(tokenizer, prompt_file, max_prompt_tokens=3)
    assert task.prompt_len == 3
    for row, prompt in enumerate(PROMPTS):
        assert task.prompt_tokens[row].tolist() == tokenizer(prompt)["input_ids"][-3:]


def test_the_chat_template_makes_each_prompt_a_user_turn_awaiting_the_assistant(tokenizer,
                                                                               prompt_file):
    task = make_task(tokenizer, prompt_file, chat_template=True)
    text = tokenizer.decode(task.prompt_tokens[0][task.prompt_mask[0]])
    assert text == f"{tokenizer.bos_token}<|user|>The movie was\n<|assistant|>"


def test_the_chat_template_needs_a_tokenizer_that_has_one(tokenizer, prompt_file):
    bare = build_tokenizer(Path(prompt_file).parent / "bare")
    bare.chat_template = None
    with pytest.raises(ConfigError, match="task.chat_template must be false"):
        make_task(bare, prompt_file, chat_template=True)


def rollout_of(task: TextTask, tokenizer, index: list[int], completions: list[str]) -> Rollout:
    """Completions written out as a sampled Rollout would hold them: EOS, then EOS filler
    outside the mask; a completion of ``max_new_tokens`` tokens ends without EOS."""
    ids = [(tokenizer(c, add_special_tokens=False)["input_ids"] + [task.eos_id])
           [:task.max_new_tokens] for c in completions]
    rows = torch.full((len(ids), task.max_new_tokens), task.eos_id)
    mask = torch.zeros(rows.shape, dtype=torch.bool)
    for i, row in enumerate(ids):
        rows[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = True
    index = torch.tensor(index)
    return Rollout(tokens=torch.cat([task.prompt_tokens[index], rows], dim=1),
                   prompt_mask=task.prompt_mask[index], mask=mask,
                   old_logp=torch.zeros(mask.shape), prompt_index=index)


def test_the_reward_sees_prompt_text_completion_text_and_row_fields(tokenizer, prompt_file):
    task = make_task(tokenizer, prompt_file, chat_template=True, max_new_tokens=8)
    SEEN.clear()
    rollout = rollout_of(task, tokenizer, [2, 0, 2], [" good.", "It was great", "ok"])
    rewards = task.reward(rollout)
    assert SEEN == [{"prompts": [PROMPTS[2], PROMPTS[0], PROMPTS[2]],
                     "completions": [" good.", "It was great", "ok"], "answer": [7, 1, 7]}]
    assert rewards.tolist() == [6.0, 12.0, 2.0] and rewards.dtype == torch.float32


def test_a_completion_cut_at_max_new_tokens_is_decoded_whole(tokenizer, prompt_file):
    task = make_task(tokenizer, prompt_file, max_new_tokens=3)
    long = "The food was great and I am happy."
    cut = tokenizer.decode(tokenizer(long, add_special_tokens=False)["input_ids"][:3])
    assert task.completion_texts(rollout_of(task, tokenizer, [0], [long])) == [cut]


def test_rewards_sum_with_their_weights_and_a_failing_one_ends_the_run(tokenizer, prompt_file):
    task = make_task(tokenizer, prompt_file, reward=[
        {"_target_": f"{HERE}.recording_reward", "weight": 2.0},
        {"name": "length", "weight": -1.0, "target_words": 1}])
    rollout = rollout_of(task, tokenizer, [0, 1], ["good", "very good"])
    assert task.reward(rollout).tolist() == [2 * 4 - 1.0, 2 * 9 - 0.0]
    failing = make_task(tokenizer, prompt_file, reward="length")
    failing.terms[0] = dataclasses.replace(failing.terms[0], fn=lambda **_: [1.0])
    with pytest.raises(RunFailed, match=r"^reward length returned 1 values for 2 completions$"):
        failing.reward(rollout)


def test_preference_pairs_are_rows_chosen_then_rejected(tokenizer, tmp_path, prompt_file):
    pairs = [{"prompt": "The movie was", "chosen": " good.", "rejected": " bad."},
             {"prompt": "What is 2 + 3?", "chosen": " 5", "rejected": " The cat sat on the mat."}]
    task = make_task(tokenizer, prompt_file, max_new_tokens=6,
                     preferences=write(pairs, tmp_path / "prefs.jsonl"))
    rollout = task.preference_pairs()
    assert rollout.group_size == 2 and rollout.prompt_index.tolist() == [0, 0, 1, 1]
    assert torch.equal(rollout.old_logp, torch.zeros(rollout.mask.shape))
    prompt_ids = [tokenizer(p["prompt"])["input_ids"] for p in pairs]
    assert rollout.prompt_len == max(map(len, prompt_ids))
    answers = [p[side] for p in pairs for side in ("chosen", "rejected")]
    for row, answer in enumerate(answers):
        prompt = prompt_ids[row // 2]
        assert rollout.prompts[row][rollout.prompt_mask[row]].tolist() == prompt
        assert not rollout.prompt_mask[row, :rollout.prompt_len - len(prompt)].any()
        expected = (tokenizer(answer, add_special_tokens=False)["input_ids"]
                    + [task.eos_id])[:6]
        n = len(expected)
        assert rollout.completions[row, :n].tolist() == expected
        assert rollout.mask[row].tolist() == [True] * n + [False] * (rollout.mask.shape[1] - n)
        assert (rollout.completions[row, n:] == task.eos_id).all()
    assert rollout.completions[3, -1] != task.eos_id  # the long rejection is cut, no EOS


def test_no_preference_file_gives_no_pairs(tokenizer, prompt_file):
    assert make_task(tokenizer, prompt_file).preference_pairs() is None


def test_the_yaml_sets_every_field_of_the_schema_and_checks_against_it():
    node = OmegaConf.load(CONF_DIR / "task" / "text.yaml")
    assert list(node) == [f.name for f in dataclasses.fields(TextConfig)]
    check_node("task", node, TextConfig)
    assert all(f.metadata.get("help") for f in dataclasses.fields(TextConfig))


def bad(tmp_path: Path, case: str) -> dict:
    """A task node with one problem, and ROWS in prompts.jsonl beside it."""
    good = write(ROWS, tmp_path / "prompts.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    nodes = {
        "missing file": {"prompts": str(tmp_path / "nope.jsonl")},
        "empty file": {"prompts": str(tmp_path / "empty.jsonl")},
        "no rows": {"prompts": write([{"prompt": " "}], tmp_path / "blank.txt")},
        "unknown suffix": {"prompts": str(tmp_path / "empty.jsonl").replace("jsonl", "xml")},
        "malformed file": {"prompts": str(tmp_path / "broken.jsonl")},
        "plain directory": {"prompts": str(tmp_path / "folder")},
        "missing field": {"prompts": good, "prompt_field": "question"},
        "empty prompt": {"prompts": write(ROWS + [{"prompt": "", "answer": 0}],
                                          tmp_path / "holes.csv")},
        "both sources": {"prompts": good, "dataset": "imdb"},
        "no source": {},
        "bad target": {"prompts": good, "reward": {"_target_": "nowhere.reward"}},
        "not callable": {"prompts": good, "reward": {"_target_": f"{HERE}.ROWS"}},
        "unknown name": {"prompts": good, "reward": [{"name": "sentiment"}, "vibes"]},
        "answer missing": {"prompts": write([{"prompt": "hi"}], tmp_path / "q.jsonl"),
                           "reward": "arithmetic"},
        "no reward": {"prompts": good, "reward": None},
        "bad preferences": {"prompts": good, "preferences": good},
    }
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"\n')
    (tmp_path / "folder").mkdir()
    if case == "unknown suffix":
        Path(nodes[case]["prompts"]).write_text("<xml/>")
    return OmegaConf.create({**_defaults(), **nodes[case]})


BAD_INPUTS = {
    "missing file": r"task.prompts must be an existing file or directory \(got '.*nope.jsonl'\)",
    "empty file": r"task.prompts must not be empty \(got '.*empty.jsonl'\)",
    "no rows": r"task.prompts must have at least one row \(got '.*blank.txt' with none\)",
    "unknown suffix": r"task.prompts must end in one of .jsonl, .json, .csv, .parquet, .txt "
                      r"or be a save_to_disk directory \(got '.*empty.xml'\)",
    "malformed file": r"task.prompts could not be read as json \(got '.*broken.jsonl': .+\)",
    "plain directory": r"task.prompts must be a directory written by save_to_disk "
                       r"\(got '.*folder'\)",
    "missing field": r"task.prompt_field must be a field of task.prompts \(got 'question'; "
                     r"fields: prompt, answer\)",
    "empty prompt": r"task.prompts row 3: prompt must be a non-empty string \(got None\)",
    "both sources": r"exactly one of task.prompts \(a local file\) or task.dataset \(a hub id\) "
                    r"must be set \(got both\)",
    "no source": r"exactly one of .* must be set \(got neither\)",
    "bad target": r"task.reward._target_ must name an importable callable "
                  r"\(got 'nowhere.reward': Error locating target 'nowhere.reward'\)",
    "not callable": r"task.reward._target_ must name an importable callable "
                    r"\(got 'test_text_task.ROWS': Expected a callable target",
    "unknown name": r"task.reward\[1\].name must be one of sentiment, length, format, "
                    r"arithmetic \(got 'vibes'\)",
    "answer missing": r"task.reward: reward arithmetic cannot be called .* with the prompt "
                      r"data's fields \(none\): missing a required argument: 'answer'",
    "no reward": r"task.reward must be set when task.reward_model is null \(got null\)",
    "bad preferences": r"task.preferences must have the fields prompt, chosen, rejected "
                       r"\(TRL's preference format; got '.*prompts.jsonl' with fields "
                       r"prompt, answer\)",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_check_text_task_names_the_key_the_value_and_what_is_allowed(tmp_path, case):
    node = bad(tmp_path, case)
    with pytest.raises(ConfigError) as err:
        check_text_task(node)
    message = str(err.value).replace(HERE, "test_text_task")
    assert "\n" not in message
    assert re.fullmatch(BAD_INPUTS[case] + ".*", message), message


def test_check_text_task_passes_a_good_node_and_writes_nothing(tmp_path):
    prompts = write(ROWS, tmp_path / "prompts.jsonl")
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = sorted(cache.rglob("*")) if cache.exists() else []
    check_text_task(OmegaConf.create({**_defaults(), "prompts": prompts,
                                      "reward": [{"name": "arithmetic"}, "sentiment"]}))
    assert list(tmp_path.iterdir()) == [Path(prompts)]
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before


def test_a_hub_dataset_is_not_loaded_by_the_check():
    check_text_task(OmegaConf.create({**_defaults(), "dataset": "imdb"}))


@pytest.mark.parametrize("model", ["tiny", "hf"])
def test_a_model_without_a_tokenizer_is_refused_before_training(tmp_path, model):
    prompts = write(ROWS, tmp_path / "prompts.jsonl")
    with pytest.raises(ConfigError) as err:
        compose_and_validate({"task": "text", "model": model, "task.prompts": prompts,
                              "task.reward": "length"})
    assert str(err.value) == (f"task=text needs the tokenizer of a checkpoint, and "
                              f"model={model} with model.name=null has none: set model=hf and "
                              f"model.name to a hub id or a local directory")
