"""The text task: prompts from a local file or a ``datasets`` data set, tokenised once with
the model's tokenizer; the reward of a completion computed on decoded text by built-in
rewards, Python callables with TRL's shape or a reward model (klsweep.rewards); DPO
preference pairs from a file in TRL's prompt/chosen/rejected format.

Local files are read through ``datasets`` by their suffix (.jsonl/.json, .csv, .parquet, .txt
with one prompt a line, blank lines skipped) or, for a directory, as written by
``Dataset.save_to_disk``. A hub data set (``task.dataset``) needs a network or the HF cache.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from klsweep.rewards import RewardModel, RewardTerm, reward_terms, score_terms
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import ConfigError, from_node, spec
from klsweep.tasks.base import Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# suffix → the ``datasets`` builder that reads it
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
                ".txt": "text"}
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class TextConfig:
    """The ``task`` node of ``task=text`` (conf/task/text.yaml): the class the task uses is
    the schema that validates it."""

    name: str = spec(kind="choice", choices=("text",), help="the task")
    prompts: str | None = spec(kind="string", optional=True, help=(
        "local prompt file (.jsonl/.json/.csv/.parquet/.txt) or save_to_disk directory"))
    dataset: str | None = spec(kind="string", optional=True, help=(
        "a datasets hub id instead of task.prompts (needs a network or the HF cache)"))
    dataset_config: str | None = spec(kind="string", optional=True,
                                      help="the hub data set's configuration name, if any")
    split: str = spec(kind="string",
                      help="split of task.dataset or of a saved DatasetDict")
    prompt_field: str = spec(kind="string",
                             help="the column holding the prompt text; other columns go to "
                                  "the rewards as row fields")
    chat_template: bool = spec(kind="bool", help=(
        "format each prompt as one user turn with the tokenizer's chat template"))
    max_prompt_tokens: int = spec(kind="integer", ge=1,
                                  help="longer prompts keep their last tokens")
    max_new_tokens: int = spec(kind="integer", ge=1,
                               help="the longest completion, EOS included")
    reward: Any = spec(kind="reward", optional=True, help=(
        "a built-in name, a {_target_: ...} callable, or a list of terms with weights "
        "(klsweep/rewards.py); checked by check_text_task"))
    reward_model: str | None = spec(kind="string", optional=True, help=(
        "sequence-classification reward model (hub id or path), added to task.reward"))
    reward_model_weight: float = spec(kind="number",
                                      help="the reward model's weight in the sum")
    reward_batch_size: int = spec(kind="integer", ge=1,
                                  help="texts per reward-model forward pass")
    preferences: str | None = spec(kind="string", optional=True, help=(
        "DPO preference file or directory with prompt, chosen, rejected fields (TRL's)"))

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        check_text_task(cfg.task)
        check_tokenizer_source(cfg.model)


# ---------------------------------------------------------------------------------------------
# Reading rows


def read_rows(path: str, key: str, split: str = "train",
              text_field: str = "text") -> list[dict[str, Any]]:
    """Every row of a local file or saved data set directory (relative paths from where the
    command was launched), read through ``datasets`` without writing to its cache. A text
    file's lines become ``text_field``. Raises ConfigError naming ``key`` when the path is
    missing, unreadable or empty."""
    from hydra.utils import to_absolute_path

    file = Path(to_absolute_path(str(Path(path).expanduser())))
    if not file.exists():
        raise ConfigError(f"{key} must be an existing file or directory (got {path!r})")
    rows = (_read_directory(file, path, key, split) if file.is_dir()
            else _read_file(file, path, key, text_field))
    if not rows:
        raise ConfigError(f"{key} must have at least one row (got {path!r} with none)")
    return rows


def _read_directory(file: Path, path: str, key: str, split: str) -> list[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(file))
    except FileNotFoundError:
        raise ConfigError(f"{key} must be a directory written by save_to_disk "
                          f"(got {path!r})") from None
    if isinstance(data, DatasetDict):
        if split not in data:
            raise ConfigError(f"task.split must be one of {', '.join(data)} for {key} "
                              f"(got {split!r})")
        data = data[split]
    return list(data)


def _read_file(file: Path, path: str, key: str, text_field: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    builder = FILE_FORMATS.get(file.suffix)
    if builder is None:
        raise ConfigError(f"{key} must end in one of {', '.join(FILE_FORMATS)} or be a "
                          f"save_to_disk directory (got {path!r})")
    if file.stat().st_size == 0:
        raise ConfigError(f"{key} must not be empty (got {path!r})")
    try:
        with tempfile.TemporaryDirectory() as cache:  # streaming: only lock files go there
            rows = list(load_dataset(builder, data_files=str(file), split="train",
                                     streaming=True, cache_dir=cache))
    except Exception as err:  # whatever the format's reader says, in one line
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{key} could not be read as {builder} (got {path!r}: "
                          f"{reason})") from None
    if builder == "text":
        return [{text_field: row["text"]} for row in rows if row["text"].strip()]
    return rows


def _check_texts(rows: list[dict[str, Any]], field: str, key: str) -> None:
    for i, row in enumerate(rows):
        text = row[field]
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{key} row {i}: {field} must be a non-empty string "
                              f"(got {text!r})")


def _check_source(config: TextConfig) -> None:
    if (config.prompts is None) == (config.dataset is None):
        got = "both" if config.prompts is not None else "neither"
        raise ConfigError(f"exactly one of task.prompts (a local file) or task.dataset "
                          f"(a hub id) must be set (got {got})")


def _prompt_rows(config: TextConfig) -> list[dict[str, Any]]:
    """The prompt data set's rows, checked: the prompt field exists and holds text."""
    _check_source(config)
    if config.prompts is not None:
        rows = read_rows(config.prompts, "task.prompts", config.split, config.prompt_field)
    else:
        from datasets import load_dataset

        rows = list(load_dataset(config.dataset, config.dataset_config, split=config.split))
    source = "task.prompts" if config.prompts is not None else "task.dataset"
    if config.prompt_field not in rows[0]:
        raise ConfigError(f"task.prompt_field must be a field of {source} "
                          f"(got {config.prompt_field!r}; fields: {', '.join(rows[0])})")
    _check_texts(rows, config.prompt_field, source)
    return rows


def _preference_rows(path: str) -> list[dict[str, Any]]:
    rows = read_rows(path, "task.preferences")
    missing = [f for f in PREFERENCE_FIELDS if f not in rows[0]]
    if missing:
        raise ConfigError(f"task.preferences must have the fields {', '.join(PREFERENCE_FIELDS)} "
                          f"(TRL's preference format; got {path!r} with fields "
                          f"{', '.join(rows[0])})")
    for field in PREFERENCE_FIELDS:
        _check_texts(rows, field, "task.preferences")
    return rows


def _row_fields(rows: list[dict[str, Any]], prompt_field: str) -> dict[str, list[Any]]:
    return {name: [row[name] for row in rows] for name in rows[0] if name != prompt_field}


def check_text_task(task: Any) -> None:
    """Check a ``task=text`` node before training, writing nothing: the prompt source, its
    prompt field, the preference file and every reward term. Raises ConfigError in one line.
    A hub data set is not loaded here (that would download it); the run checks it."""
    config = task if isinstance(task, TextConfig) else from_node(TextConfig, task)
    _check_source(config)
    columns = None
    if config.prompts is not None:
        columns = list(_row_fields(_prompt_rows(config), config.prompt_field))
    if config.preferences is not None:
        _preference_rows(config.preferences)
    if config.reward is None and config.reward_model is None:
        raise ConfigError("task.reward must be set when task.reward_model is null (got null)")
    reward_terms(config.reward, columns=columns)


# ---------------------------------------------------------------------------------------------
# The task


def check_tokenizer_source(model: Any) -> None:
    """The text task reads and writes text through the tokenizer of the checkpoint that
    ``model.name`` names: a random model (model.name=null) or model=tiny has none."""
    if model.get("name") is None:
        raise ConfigError(f"task=text needs the tokenizer of a checkpoint, and model="
                          f"{model.get('kind')} with model.name=null has none: set model=hf and "
                          f"model.name to a hub id or a local directory")


def pad_rows(rows: list[list[int]], value: int, side: str) -> tuple[Tensor, Tensor]:
    """Token lists as a [n, longest] tensor padded with ``value`` on ``side`` ("left" or
    "right"), and the mask [n, longest] of real tokens."""
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        tokens[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = True
    return tokens, mask


class TextTask(Task):
    """Prompts of a text data set for a transformers causal LM, rewarded on decoded text."""

    name = "text"
    Config = TextConfig
    needs_tokenizer = True

    def __init__(self, config: TextConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.config = config
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ConfigError("model.name must have a tokenizer with an EOS token, which ends "
                              "completions (got none)")
        self.eos_id = tokenizer.eos_token_id
        # as on the model side: without a pad token, pad with EOS (the masks hide it)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)
        self.max_new_tokens = config.max_new_tokens
        rows = _prompt_rows(config)
        self.texts = [row[config.prompt_field] for row in rows]
        self.row_fields = _row_fields(rows, config.prompt_field)
        self.prompt_tokens, self.prompt_mask = pad_rows(self._prompt_ids(self.texts),
                                                        self.pad_id, "left")
        self.prompt_len = self.prompt_tokens.shape[1]
        self.terms = reward_terms(config.reward, columns=list(self.row_fields))
        self.reward_model = (RewardModel(config.reward_model, config.reward_batch_size)
                             if config.reward_model is not None else None)
        if self.reward_model is not None:
            self.terms.append(RewardTerm(config.reward_model, self.reward_model,
                                         config.reward_model_weight))

    def _prompt_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each prompt, chat-formatted if configured, cut to their last
        ``max_prompt_tokens`` (the end is what the completion continues)."""
        c = self.config
        if c.chat_template:
            if self.tokenizer.chat_template is None:
                raise ConfigError("task.chat_template must be false for a tokenizer without "
                                  "a chat template (got true)")
            texts = self.tokenizer.apply_chat_template(
                [[{"role": "user", "content": text}] for text in texts],
                tokenize=False, add_generation_prompt=True)
        # a chat template writes its own special tokens (BOS among them)
        ids = self.tokenizer(texts, add_special_tokens=not c.chat_template)["input_ids"]
        return [row[-c.max_prompt_tokens:] for row in ids]

    def sample_prompts(self, n: int, generator: torch.Generator) -> Prompts:
        """``n`` rows of the data set drawn uniformly with replacement, left-padded to
        ``prompt_len``; ``index`` holds their row ids."""
        index = torch.randint(len(self.texts), (n,), generator=generator)
        return Prompts(self.prompt_tokens[index], self.prompt_mask[index], index)

    def completion_texts(self, rollout: Rollout) -> list[str]:
        """Each completion decoded up to, not including, EOS, without special tokens."""
        completions = rollout.completions.cpu()
        keep = (rollout.mask & (rollout.completions != self.eos_id)).cpu()
        return self.tokenizer.batch_decode([row[k].tolist() for row, k in zip(
            completions, keep, strict=True)], skip_special_tokens=True)

    def reward(self, rollout: Rollout) -> Tensor:
        """The weighted sum of the reward terms on each row's prompt text (as in the data
        set), its completion text and its row fields."""
        if rollout.prompt_index is None:
            raise ValueError("the text task scores rollouts of its own prompts: "
                             "rollout.prompt_index must be set")
        index = rollout.prompt_index.tolist()
        prompts = [self.texts[i] for i in index]
        row_fields = {name: [column[i] for i in index] for name, column in self.row_fields.items()}
        device = rollout.tokens.device
        if self.reward_model is not None:
            self.reward_model.to(device)
        return score_terms(self.terms, prompts, self.completion_texts(rollout),
                           row_fields).to(device)

    def preference_pairs(self) -> Rollout | None:
        """DPO pairs of ``task.preferences`` as a Rollout, or None when no file is set.

        Rows (2i, 2i+1) are pair i's (chosen, rejected) with ``group_size=2``; ``prompt_index``
        is i, the pair's row in the preference file (a row of ``task.prompts`` only when both
        name the same file). Prompts are tokenised as ``sample_prompts``'s and left-padded to
        the widest; completions without special tokens, EOS appended (inside ``mask``), cut
        to ``max_new_tokens`` as a sampled completion would be, right-padded with EOS.
        ``old_logp`` is zeros: no sampling policy drew them. Reads the file on each call."""
        c = self.config
        if c.preferences is None:
            return None
        rows = _preference_rows(c.preferences)
        prompt_ids = self._prompt_ids([row["prompt"] for row in rows])
        prompts, prompt_mask = pad_rows([ids for ids in prompt_ids for _ in (0, 1)],
                                        self.pad_id, "left")
        answers = [row[side] for row in rows for side in ("chosen", "rejected")]
        answer_ids = self.tokenizer(answers, add_special_tokens=False)["input_ids"]
        completions, mask = pad_rows([(ids + [self.eos_id])[:c.max_new_tokens]
                                      for ids in answer_ids], self.eos_id, "right")
        return Rollout(tokens=torch.cat([prompts, completions], dim=1), prompt_mask=prompt_mask,
                       mask=mask, old_logp=torch.zeros(mask.shape), group_size=2,
                       prompt_index=torch.arange(len(rows)).repeat_interleave(2))
