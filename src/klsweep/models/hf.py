"""Any transformers causal LM as a klsweep model: ``model=hf``.

``HFCausalLM`` adapts a transformers model (or a peft LoRA model around one) to the
interface of ``models/base.py``. ``build_hf`` makes the policy and its reference: a frozen
copy, another checkpoint (``model.reference_name``), or, with LoRA, the policy itself
with its adapter disabled (no second copy in memory, as TRL). With ``model.name:
null`` a random ``model.arch`` at the task's vocabulary is trained by the task's reference
recipe, as ``model=tiny`` is, so the synthetic tasks run on real transformer architectures.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor, nn

from klsweep.models.reference import pretrained_reference
from klsweep.schema import ConfigError, check_node, from_node, spec

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

# transformers and peft are imported where they are used: importing transformers takes ~3 s,
# which every run with model=tiny would otherwise pay

ARCHS = ("gpt2", "llama", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass
class LoraSettings:
    """The ``model.lora`` node: a LoRA adapter (Hu et al. 2021) through peft."""

    r: int = spec(16, kind="integer", ge=1, help="adapter rank (TRL's ModelConfig: 16)")
    alpha: float = spec(32, kind="number", gt=0,
                        help="updates scale by alpha / r (TRL's ModelConfig: 32)")
    dropout: float = spec(0.0, kind="number", ge=0, lt=1,
                          help="dropout on the adapter's input; 0 with disable_dropout")
    # a string (all-linear, or a regex peft matches) or a list of names: checked by check_model
    target_modules: Any = spec("all-linear", kind="modules",
                               help="module names, or all-linear (QLoRA: every linear layer)")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple, ListConfig)):
            self.target_modules = list(self.target_modules)


@dataclass
class HFModelConfig:
    """``model=hf`` (defaults: conf/model/hf.yaml): a transformers causal LM."""

    kind: str = spec(kind="choice", choices=("hf",), help="the model kind")
    name: str | None = spec(kind="string", optional=True,
                            help="hub id or local dir; null: a random arch trained by the "
                                 "task's recipe")
    arch: str = spec(kind="choice", choices=ARCHS,
                     help="architecture built when name is null")
    n_layer: int = spec(kind="integer", ge=1, help="layers of arch")
    n_head: int = spec(kind="integer", ge=1, help="attention heads of arch")
    n_embd: int = spec(kind="integer", ge=1, help="width of arch (a multiple of n_head)")
    dtype: str = spec(kind="choice", choices=DTYPES,
                      help="weights' dtype; float32 with trainer precision bf16-mixed on GPU")
    attn_implementation: str = spec(kind="choice", choices=ATTENTION,
                                    help="transformers attention kernel")
    gradient_checkpointing: bool = spec(kind="bool",
                                        help="recompute the policy's activations in backward")
    disable_dropout: bool = spec(kind="bool",
                                 help="zero every dropout, so that π_θ scores tokens as it "
                                      "sampled them (TRL's disable_dropout)")
    trust_remote_code: bool = spec(kind="bool",
                                   help="run a checkpoint's own modelling code")
    revision: str | None = spec(kind="string", optional=True,
                                help="branch, tag or commit of name; null: the default")
    lora: LoraSettings | None = spec(kind="node", optional=True,
                                     help="null: full fine-tuning; else a LoRA adapter")
    reference_name: str | None = spec(kind="string", optional=True,
                                      help="null: the reference is the starting policy; else "
                                           "this checkpoint")
    chunk_rows: int | None = spec(kind="integer", ge=1, optional=True,
                                  help="rows per forward pass without gradient (reference "
                                       "scoring): bounds activation memory; null: all")

    def __post_init__(self) -> None:
        if isinstance(self.lora, (dict, DictConfig)):
            _check_lora_node(self.lora)
            self.lora = from_node(LoraSettings, self.lora)

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        from klsweep.tasks import TASKS

        check_model(cfg.model, cfg.trainer.accelerator)
        if cfg.model.get("name") is None and TASKS[cfg.task.name].needs_tokenizer:
            raise ConfigError(f"model.name=null builds a random model without a tokenizer, "
                              f"which task={cfg.task.name} needs: set model.name to a hub "
                              f"id or a local directory")
        if cfg.model.lora is not None and cfg.kl.reference.sync_every > 0:
            raise ConfigError(f"kl.reference.sync_every must be 0 with model.lora: the "
                              f"reference is the adapter-disabled policy, with no weights of "
                              f"its own to move (got {cfg.kl.reference.sync_every})")


def _check_lora_node(node: Any) -> None:
    check_node("model.lora", node, LoraSettings)
    targets = node.get("target_modules", "all-linear")
    if isinstance(targets, str) or (isinstance(targets, (list, ListConfig)) and len(targets)
                                    and all(isinstance(t, str) for t in targets)):
        return
    raise ConfigError(f"model.lora.target_modules must be all-linear, a regex or a list of "
                      f"module names (got {targets!r})")


class HFCache:
    """A transformers ``DynamicCache`` as the interface's ``Cache``."""

    def __init__(self, inner: DynamicCache) -> None:
        self.inner = inner

    def repeat_interleave(self, repeats: int) -> HFCache:
        # batch_repeat_interleave rebinds each layer's tensors in place: repeat a copy whose
        # layers are copies, so that this cache keeps its own batch
        new = copy.copy(self.inner)
        new.layers = [copy.copy(layer) for layer in self.inner.layers]
        new.batch_repeat_interleave(repeats)
        return HFCache(new)


def _positions(attention_mask: Tensor, length: int) -> Tensor:
    """Position ids [B, length] of the last ``length`` tokens: a left-padded row counts its
    real tokens only (as transformers' generate: cumsum − 1, clamped at 0 on padding)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, -length:]


class HFCausalLM(nn.Module):
    """A transformers causal LM (``self.model``, possibly a peft model) behind klsweep's
    model interface."""

    def __init__(self, model: nn.Module, chunk_rows: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.vocab_size: int = model.config.vocab_size
        self.hidden_size: int = model.config.hidden_size
        self.chunk_rows = chunk_rows
        self.checkpointing = False

    def _output(self, tokens: Tensor, attention_mask: Tensor | None, cache: HFCache | None,
                keep: int, **kwargs: Any) -> Any:
        """The model's output on ``tokens``; logits of the last ``keep`` positions only (0:
        all), so that [B, T, vocab] is never made when fewer are needed."""
        if attention_mask is not None:
            kwargs.update(attention_mask=attention_mask.long(),
                          position_ids=_positions(attention_mask, tokens.shape[1]))
        return self.model(input_ids=tokens, cache=None if cache is None else cache.inner,
                          use_cache=cache is not None, logits_to_keep=keep, **kwargs)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None,
                cache: HFCache | None = None) -> Tensor:
        """Logits [B, T, vocab]; with a cache, ``tokens`` continue the cached sequences and
        ``attention_mask`` covers the cached and the new positions."""
        return self._output(tokens, attention_mask, cache, keep=0).logits

    def new_cache(self, batch_size: int, max_len: int) -> HFCache:
        """An empty cache; a DynamicCache grows as it is filled, so ``max_len`` is unused."""
        from transformers import DynamicCache

        return HFCache(DynamicCache(config=self.model.config))

    def completion_logits(self, tokens: Tensor, attention_mask: Tensor | None,
                          prompt_len: int, group_size: int = 1) -> Tensor:
        """Logits [B, N, vocab] predicting ``tokens[:, prompt_len:]``. With ``group_size``
        > 1 each shared prompt is computed once, its keys and values (with gradient)
        repeated for its group, except under gradient checkpointing, which refuses a cache."""
        if self._chunked(tokens):
            return self._by_chunks(
                lambda t, m: self.completion_logits(t, m, prompt_len, group_size),
                tokens, attention_mask, group_size)
        n = tokens.shape[1] - prompt_len
        if group_size > 1 and n > 1 and not (self.checkpointing and self.training):
            return self._shared_prompt_logits(tokens, attention_mask, prompt_len, group_size)
        mask = None if attention_mask is None else attention_mask[:, :-1]
        return self._output(tokens[:, :-1], mask, None, keep=n).logits

    def _shared_prompt_logits(self, tokens: Tensor, attention_mask: Tensor | None,
                              prompt_len: int, group_size: int) -> Tensor:
        cache = self.new_cache(0, 0)
        prompt_mask = None if attention_mask is None else attention_mask[::group_size,
                                                                         :prompt_len]
        last = self._output(tokens[::group_size, :prompt_len], prompt_mask, cache, keep=1).logits
        rest_mask = None if attention_mask is None else attention_mask[:, :-1]
        rest = self._output(tokens[:, prompt_len:-1], rest_mask,
                            cache.repeat_interleave(group_size), keep=0).logits
        return torch.cat([last.repeat_interleave(group_size, dim=0), rest], dim=1)

    def completion_hidden(self, tokens: Tensor, attention_mask: Tensor | None,
                          prompt_len: int) -> Tensor:
        """Final hidden states [B, N, hidden] (the lm head's input) at the positions that
        predict each completion token."""
        if self._chunked(tokens):
            return self._by_chunks(lambda t, m: self.completion_hidden(t, m, prompt_len),
                                   tokens, attention_mask)
        mask = None if attention_mask is None else attention_mask[:, :-1]
        out = self._output(tokens[:, :-1], mask, None, keep=1, output_hidden_states=True)
        return out.hidden_states[-1][:, prompt_len - 1:]

    def _chunked(self, tokens: Tensor) -> bool:
        # with gradient, chunks would keep every chunk's activations anyway
        return (self.chunk_rows is not None and not torch.is_grad_enabled()
                and tokens.shape[0] > self.chunk_rows)

    def _by_chunks(self, fn: Callable[[Tensor, Tensor | None], Tensor], tokens: Tensor,
                   attention_mask: Tensor | None, group_size: int = 1) -> Tensor:
        """``fn(tokens, mask)`` over chunks of whole prompt groups, of at most
        ``chunk_rows`` rows where a group fits, concatenated."""
        rows = max(self.chunk_rows // group_size, 1) * group_size
        chunks = tokens.split(rows)
        masks = [None] * len(chunks) if attention_mask is None else attention_mask.split(rows)
        return torch.cat([fn(t, m) for t, m in zip(chunks, masks, strict=True)])

    def init_weights(self) -> None:
        """Fresh initial weights from torch's global generator (the reference recipes')."""
        # transformers skips whatever it has marked initialised (loaded or drawn before)
        model = self.model
        for item in itertools.chain(model.modules(), model.parameters(), model.buffers()):
            item._is_hf_initialized = False
        model.init_weights()

    def enable_checkpointing(self) -> None:
        """Gradient (activation) checkpointing of the decoder layers; non-reentrant, so that
        frozen embeddings under LoRA need no input gradients."""
        self.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointing = True


class AdapterDisabled(nn.Module):
    """The reference of a LoRA policy: the policy's own calls with its adapter disabled,
    without gradient and in eval mode; no second copy of the base model (TRL's
    ``with model.disable_adapter():``).

    The policy is held but not registered: the pair's ``reference.eval()`` then leaves the
    policy's mode alone, and the policy's parameters are neither counted nor frozen through
    the reference. A zero-size frozen parameter moves with the module, so that
    ``next(reference.parameters()).device`` (the tasks' idiom) names its device."""

    def __init__(self, policy: HFCausalLM) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)
        self.vocab_size = policy.vocab_size
        self.hidden_size = policy.hidden_size
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @contextmanager
    def _base_model(self) -> Iterator[None]:
        policy = self.policy
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), policy.model.disable_adapter():
                yield
        finally:
            policy.train(was_training)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None,
                cache: HFCache | None = None) -> Tensor:
        with self._base_model():
            return self.policy(tokens, attention_mask, cache)

    def new_cache(self, batch_size: int, max_len: int) -> HFCache:
        return self.policy.new_cache(batch_size, max_len)

    def completion_logits(self, tokens: Tensor, attention_mask: Tensor | None,
                          prompt_len: int, group_size: int = 1) -> Tensor:
        with self._base_model():
            return self.policy.completion_logits(tokens, attention_mask, prompt_len, group_size)

    def completion_hidden(self, tokens: Tensor, attention_mask: Tensor | None,
                          prompt_len: int) -> Tensor:
        with self._base_model():
            return self.policy.completion_hidden(tokens, attention_mask, prompt_len)


def save_adapter(policy: HFCausalLM, directory: str | Path) -> None:
    """Write a LoRA policy's adapter (only) into ``directory``, for
    ``PeftModel.from_pretrained(base_model, directory)``."""
    from peft import PeftModel

    if not isinstance(policy.model, PeftModel):
        raise ValueError("save_adapter needs a LoRA policy (model.lora is null)")
    policy.model.save_pretrained(str(directory))


# --- building the policy and its reference -------------------------------------------------

def build_hf(model_cfg: Any, task: Any) -> tuple[HFCausalLM, nn.Module]:
    """``model=hf``: the policy (in train mode) and its reference (frozen, eval mode)."""
    cfg = _config(model_cfg)
    base = _from_checkpoint(cfg, task) if cfg.name is not None else _from_recipe(cfg, task)
    reference = None if cfg.reference_name is None else _reference_name(cfg, base)
    if cfg.lora is not None:
        policy = HFCausalLM(_with_lora(base.model, cfg.lora), cfg.chunk_rows)
        reference = AdapterDisabled(policy) if reference is None else reference
    else:
        policy = base.requires_grad_(True)
        reference = _frozen(copy.deepcopy(base)) if reference is None else reference
    if cfg.gradient_checkpointing:
        policy.enable_checkpointing()
    return policy.train(), reference


def _config(model_cfg: Any) -> HFModelConfig:
    """``model_cfg`` as an HFModelConfig: built already (``build_models``), or a node."""
    if isinstance(model_cfg, HFModelConfig):
        return model_cfg
    check_node("model", model_cfg, HFModelConfig)
    return from_node(HFModelConfig, model_cfg)


def _from_checkpoint(cfg: HFModelConfig, task: Any) -> HFCausalLM:
    if task.reference_recipe() is not None:
        raise ConfigError(f"model.name={cfg.name!r} is pretrained, but "
                          f"task={task.name} trains its reference from scratch: set "
                          f"model.name=null and model.arch (allowed: {', '.join(ARCHS)})")
    loaded = _load(cfg, "model.name", cfg.name, cfg.revision)
    model = HFCausalLM(loaded, cfg.chunk_rows)
    if task.vocab_size > model.vocab_size:
        raise ConfigError(f"model.name={cfg.name!r} has {model.vocab_size} token "
                          f"ids, fewer than task={task.name}'s {task.vocab_size}")
    return _dropout_off(model) if cfg.disable_dropout else model


def _from_recipe(cfg: HFModelConfig, task: Any) -> HFCausalLM:
    """A random ``cfg.arch`` at the task's vocabulary, trained by the task's recipe (or
    loaded from its cache), as ``build_tiny`` does."""
    recipe = task.reference_recipe()
    if recipe is None:
        raise ConfigError(f"model.name=null builds a random model.arch={cfg.arch}, which "
                          f"needs a task that trains its reference (task={task.name} has none): "
                          f"set model.name to a hub id or a local directory")
    import transformers
    from transformers import AutoModelForCausalLM

    block_size = task.prompt_len + task.max_new_tokens
    config = arch_config(cfg, task.vocab_size, block_size, task.eos_id)
    # building draws initial weights the recipe redraws from its own seed: it must not move
    # the run's random state either
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.dtype),
                                                 attn_implementation=cfg.attn_implementation)
    model = HFCausalLM(model, cfg.chunk_rows)
    if cfg.disable_dropout:
        _dropout_off(model)
    key = {"hf": cfg.arch, "vocab_size": task.vocab_size, "block_size": block_size,
           "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
           "dtype": cfg.dtype, "disable_dropout": cfg.disable_dropout,
           # initialisation and module layout may change with the library's version
           "transformers": transformers.__version__}
    return pretrained_reference(model, key, recipe)


def arch_config(cfg: HFModelConfig, vocab_size: int, block_size: int,
                eos_id: int) -> PretrainedConfig:
    """The transformers config of ``cfg.arch`` at the given sizes: tied embeddings and an
    MLP 4× wide in every arch (as model=tiny), so that archs compare at equal width."""
    import transformers

    # the exact task's EOS lies outside its vocabulary: its completions have one length
    eos = eos_id if 0 <= eos_id < vocab_size else None
    ids = dict(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=None,
               tie_word_embeddings=True)
    if cfg.arch == "gpt2":
        return transformers.GPT2Config(n_positions=block_size, n_embd=cfg.n_embd,
                                       n_layer=cfg.n_layer, n_head=cfg.n_head, **ids)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
    return config_class[cfg.arch](
        hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head, max_position_embeddings=block_size, **ids)


def _load(cfg: HFModelConfig, key: str, name: str, revision: str | None) -> PreTrainedModel:
    """``from_pretrained`` with the config's dtype and attention; a failure (not found,
    offline, a missing kernel) is one line naming ``key``."""
    from transformers import AutoModelForCausalLM

    try:
        # loading must not move the run's random state (missing weights are drawn)
        with torch.random.fork_rng(devices=[]):
            return AutoModelForCausalLM.from_pretrained(
                _local_or_hub(name), dtype=getattr(torch, cfg.dtype),
                attn_implementation=cfg.attn_implementation, revision=revision,
                trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"{key}={name!r} could not be loaded: {_first_line(err)}") from None


def _local_or_hub(name: str) -> str:
    """``name`` with ``~`` expanded where it is a local directory (transformers expands
    nothing), else the hub id as given."""
    path = Path(name).expanduser()
    return str(path) if path.is_dir() else name


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _reference_name(cfg: HFModelConfig, policy: HFCausalLM) -> HFCausalLM:
    reference = HFCausalLM(_load(cfg, "model.reference_name", cfg.reference_name, None),
                           cfg.chunk_rows)
    if reference.vocab_size != policy.vocab_size:
        raise ConfigError(f"model.reference_name={cfg.reference_name!r} has "
                          f"{reference.vocab_size} token ids, the policy {policy.vocab_size}")
    return _frozen(reference)


def _frozen(model: HFCausalLM) -> HFCausalLM:
    return model.requires_grad_(False).eval()


def _dropout_off(model: nn.Module) -> nn.Module:
    """Zero every dropout: the modules' and the float rates that attention kernels read
    (Llama's and Qwen2's ``attention_dropout``)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def _with_lora(model: PreTrainedModel, lora: LoraSettings) -> nn.Module:
    """``model`` with a LoRA adapter: only the adapter's parameters train."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora.target_modules
    if not isinstance(targets, str):
        names = [name for name, _ in model.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = ", ".join(_linear_names(model))
            raise ConfigError(f"model.lora.target_modules has {', '.join(missing)}, not a module "
                              f"of this model (its linear layers: {linear})")
    # GPT-2's Conv1D stores its weight transposed; peft would warn and correct it
    transposed = any(isinstance(module, Conv1D) for module in model.modules())
    config = LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha,
                        lora_dropout=lora.dropout, target_modules=targets,
                        fan_in_fan_out=transposed)
    try:
        with warnings.catch_warnings():  # peft calls a transformers alias deprecated in 5.x
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"model.lora.target_modules={targets!r}: {_first_line(err)}") from None


def _linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the modules LoRA can adapt (GPT-2's are Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (nn.Linear, Conv1D))})


# --- tokenizer and checks before training ----------------------------------------------------

def load_tokenizer(model_cfg: Any) -> Any:
    """The tokenizer of ``model.name``, padding on the left (prompts end where completions
    begin), its pad token EOS where it has none; None with ``model.name: null`` (the
    synthetic tasks have their own token ids)."""
    from transformers import AutoTokenizer

    cfg = _config(model_cfg)
    if cfg.name is None:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(_local_or_hub(cfg.name),
                                                  revision=cfg.revision,
                                                  trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"model.name={cfg.name!r}: its tokenizer could not be "
                          f"loaded: {_first_line(err)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model(model_cfg: Any, accelerator: str) -> None:
    """Raise ConfigError, one line naming key, value and what is allowed, for a ``model=hf``
    node that cannot run on ``accelerator`` (the trainer's): checked before any training.
    LoRA target modules need the model and are checked by ``build_hf``."""
    cfg = _config(model_cfg)
    if cfg.name is None:
        if cfg.reference_name is not None:
            raise ConfigError(f"model.reference_name={cfg.reference_name!r} needs "
                              f"model.name: with model.name=null the task's recipe "
                              f"trains the reference")
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"model.n_embd must be a multiple of model.n_head "
                              f"(got {cfg.n_embd} and {cfg.n_head})")
    else:
        _check_checkpoint("model.name", cfg.name, cfg.revision)
    if cfg.reference_name is not None:
        _check_checkpoint("model.reference_name", cfg.reference_name, None)
    if _runs_on_cpu(accelerator):
        if cfg.dtype == "float16":
            raise ConfigError("model.dtype=float16 needs a GPU (allowed on CPU: float32, "
                              "bfloat16)")
        if cfg.attn_implementation == "flash_attention_2":
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA GPU "
                              "(allowed on CPU: sdpa, eager)")
    if cfg.lora is not None and cfg.lora.dropout > 0 and cfg.disable_dropout:
        raise ConfigError(f"model.lora.dropout must be 0 with model.disable_dropout=true "
                          f"(got {cfg.lora.dropout})")


def _runs_on_cpu(accelerator: str) -> bool:
    if accelerator == "cpu":
        return True
    return accelerator == "auto" and not (torch.cuda.is_available()
                                          or torch.backends.mps.is_available())


def _check_checkpoint(key: str, name: str, revision: str | None) -> None:
    """A local checkpoint dir must exist and hold a config.json; anything else must be a
    well-formed hub id, and in the local cache when the hub is offline."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}={name!r} is a directory without config.json "
                              f"(allowed: a save_pretrained directory or a hub id)")
        return
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        raise ConfigError(f"{key}={name!r}: no such directory (allowed: a local checkpoint "
                          f"directory or a hub id such as Qwen/Qwen2.5-0.5B)")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{key}={name!r} is neither a directory nor a hub id (allowed: "
                          f"a local checkpoint directory or a hub id such as "
                          f"Qwen/Qwen2.5-0.5B)") from None
    if constants.HF_HUB_OFFLINE and not isinstance(
            try_to_load_from_cache(name, "config.json", revision=revision), str):
        raise ConfigError(f"{key}={name!r} is not in the local hub cache and HF_HUB_OFFLINE "
                          f"is set (allowed: a cached hub id or a local directory)")
