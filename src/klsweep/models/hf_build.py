"""``model=hf`` from its config: ``HFModelConfig``, and ``build_hf``, which makes the policy
and its reference: a frozen copy, another checkpoint (``model.reference_name``), or, with
LoRA, the policy itself with its adapter disabled. With ``model.name: null`` a random
``model.arch`` at the task's vocabulary is trained by the task's reference recipe, as
``model=tiny`` is, so the synthetic tasks run on real transformer architectures. The checks
that fail a bad model setting in one line before training live here too.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

from klsweep.models.hf import AdapterDisabled, HFCausalLM
from klsweep.models.reference import pretrained_reference
from klsweep.schema import ConfigError, check_node, from_node, spec

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

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
    lr: float = spec(1e-6, kind="number", gt=0,
                     help="optim.lr's default fine-tuning a checkpoint in full (TRL: 1e-6)")
    lora_lr: float = spec(1e-5, kind="number", gt=0,
                          help="optim.lr's default with model.lora (10x full fine-tuning's)")
    scratch_lr: float = spec(3e-4, kind="number", gt=0,
                             help="optim.lr's default for a random arch (model.name=null)")

    def default_lr(self) -> float:
        """The learning rate optim.lr=null stands for: a pretrained checkpoint's (full or
        LoRA) or a from-scratch arch's."""
        if self.name is None:
            return self.scratch_lr
        return self.lr if self.lora is None else self.lora_lr

    def __post_init__(self) -> None:
        if isinstance(self.lora, (dict, DictConfig)):
            _check_lora_node(self.lora)
            self.lora = from_node(LoraSettings, self.lora)

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        check_model(cfg.model, cfg.trainer.accelerator)
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
