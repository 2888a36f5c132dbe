"""The vLLM engine: a vLLM ``LLM`` in the training process (TRL's ``vllm_mode="colocate"``)
that samples the rollouts and receives the policy's weights in memory.

Weights go in through the worker's ``reload_weights`` (``LLM.collective_rpc``), which loads
an iterator of (HF name, tensor) in place and reruns vLLM's post-loading processing, so it
works where a layer's ``weight_loader`` is gone after start-up (vLLM issue 17915; a plain
``model.load_weights`` through ``LLM.apply_model`` fails on the CPU build). The iterator is
passed as an object, which needs the engine core in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), as a colocated engine is anyway.

Each request's sampling seed is drawn from torch's global generator, which the run seeds and
its checkpoints carry: a resumed run draws the seeds an uninterrupted one draws.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from klsweep.engines.base import InProcess
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import ConfigError

_SEED_RANGE = 2**31 - 1


class VLLMEngine(InProcess):
    """Samples with vLLM from the checkpoint ``model.name``, then from the weights each
    ``load_weights`` pushes."""

    def __init__(self, model: Any, rollout: Any, *, max_new_tokens: int, eos_id: int,
                 seed: int) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # reload_weights takes an iterator
        import vllm

        check_architecture(model.name, model.revision, model.trust_remote_code)
        self.temperature = rollout.temperature
        self.max_new_tokens = max_new_tokens
        self.eos_id = eos_id
        cache_bytes = (None if rollout.kv_cache_gib is None
                       else int(rollout.kv_cache_gib * 2**30))
        # processed_logprobs: the log-probs of the distribution sampled from (temperature
        # applied), the ones the trainer computes; vLLM's default is the raw logits'
        self.llm = vllm.LLM(model=model.name, revision=model.revision, dtype=model.dtype,
                            seed=seed, trust_remote_code=model.trust_remote_code,
                            enforce_eager=rollout.enforce_eager,
                            gpu_memory_utilization=rollout.gpu_memory_utilization,
                            kv_cache_memory_bytes=cache_bytes, skip_tokenizer_init=True,
                            logprobs_mode="processed_logprobs")
        self._check_sampling(model.name)

    def _check_sampling(self, name: str) -> None:
        """One token from one prompt, so that what vLLM only finds when it runs the model (a
        head size its attention kernels lack) fails before training, in one line."""
        from vllm import SamplingParams, TokensPrompt

        try:
            self.llm.generate([TokensPrompt(prompt_token_ids=[0])],
                              SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
        except Exception as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"rollout.engine=vllm cannot sample from model.name={name}: "
                              f"{reason}; rollout.engine=native runs it") from None

    def load_weights(self, policy: nn.Module) -> None:
        self.load_named(hf_weights(policy.model))

    @torch.no_grad()
    def load_named(self, weights: Iterator[tuple[str, Tensor]]) -> None:
        """Weights as (HF name, tensor) pairs, as ``hf_weights`` gives them (an engine in its
        own process receives them so)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    def sample(self, prompts: Prompts, n_per_prompt: int) -> Rollout:
        from vllm import SamplingParams, TokensPrompt

        seeds = torch.randint(_SEED_RANGE, (len(prompts),)).tolist()
        # the task's EOS ends a completion (stop_token_ids), not the checkpoint's own
        params = [SamplingParams(n=n_per_prompt, temperature=self.temperature,
                                 max_tokens=self.max_new_tokens, seed=seed, logprobs=0,
                                 ignore_eos=True, stop_token_ids=[self.eos_id],
                                 detokenize=False) for seed in seeds]
        requests = [TokensPrompt(prompt_token_ids=row[keep].tolist())
                    for row, keep in zip(prompts.tokens.cpu(), prompts.mask.cpu(), strict=True)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return self._rollout(prompts, n_per_prompt, outputs)

    def _rollout(self, prompts: Prompts, n_per_prompt: int, outputs: list[Any]) -> Rollout:
        """The engine's completions laid out as ``rollout.generate`` lays out its own: after
        EOS (or past its last token) a row holds EOS, masked out."""
        batch = len(prompts) * n_per_prompt
        tokens = torch.full((batch, self.max_new_tokens), self.eos_id, dtype=torch.long)
        logp = torch.zeros(batch, self.max_new_tokens)
        mask = torch.zeros(batch, self.max_new_tokens, dtype=torch.bool)
        for i, output in enumerate(outputs):
            completions = sorted(output.outputs, key=lambda c: c.index)
            for j, completion in enumerate(completions):
                row, ids = i * n_per_prompt + j, list(completion.token_ids)
                tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                steps = zip(ids, completion.logprobs, strict=True)
                logp[row, :len(ids)] = torch.tensor([step[token].logprob for token, step in steps])
                mask[row, :len(ids)] = True
        device = prompts.tokens.device
        tokens, logp, mask = tokens.to(device), logp.to(device), mask.to(device)
        index = (None if prompts.index is None
                 else prompts.index.repeat_interleave(n_per_prompt, dim=0))
        return Rollout(tokens=torch.cat([prompts.tokens.repeat_interleave(n_per_prompt, dim=0),
                                         tokens], dim=1),
                       prompt_mask=prompts.mask.repeat_interleave(n_per_prompt, dim=0),
                       mask=mask, old_logp=logp, group_size=n_per_prompt, prompt_index=index,
                       engine_logp=logp)


def check_architecture(name: str, revision: str | None, trust_remote_code: bool) -> None:
    """Refuse, before training, a checkpoint whose architecture vLLM cannot run."""
    import vllm
    from transformers import AutoConfig
    from vllm import ModelRegistry

    config = AutoConfig.from_pretrained(name, revision=revision,
                                        trust_remote_code=trust_remote_code)
    architectures = config.architectures or []
    supported = ModelRegistry.get_supported_archs()
    if not any(arch in supported for arch in architectures):
        raise ConfigError(f"rollout.engine=vllm: vLLM {vllm.__version__} cannot run "
                          f"model.name={name} (architectures "
                          f"{', '.join(architectures) or 'none given'}); "
                          f"rollout.engine=native runs it")


def hf_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of a transformers model as its checkpoint names them, which is what
    vLLM's loaders read. A peft LoRA model gives its base weights with each adapter merged,
    W + (α/r)·B·A, computed aside: the trained module is not touched."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        yield from ((name, tensor.detach()) for name, tensor in model.state_dict().items())
        return
    inner = model.get_base_model()
    deltas = {f"{name}.weight": module.get_delta_weight(module.active_adapters[0])
              for name, module in inner.named_modules()
              if isinstance(module, LoraLayer) and not module.merged}
    for name, tensor in inner.state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        yield name, (tensor + deltas[name] if name in deltas else tensor).detach()
