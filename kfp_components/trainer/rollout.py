"""Rollouts: completions sampled from the current policy inside the training loop.

:class:`HFRollouts` is the ``hf`` rollout backend: our own decode loop over the live training model (no copy
of the weights, nothing to sync after an update), on a CPU, a GPU, under DDP and under FSDP2.

* Prompts are plain token id lists (rendered and tokenized by the caller, never truncated here). Each prompt
  is repeated ``num_generations`` times; the completions of prompt ``i`` are contiguous, in prompt order.
* One left-padded, batched prefill (attention mask, position ids counted from each row's first real token),
  then one token at a time with the KV cache (the ``DynamicCache`` the model returns from the prefill).
* Sampling: temperature, then top-k (0 = off), then top-p (1 = off), then a draw from the remaining
  distribution (inverse CDF: one uniform number per row). Every prompt comes with a seed; each of its rows
  draws from its own generator, seeded by the prompt's seed and the row's number within the group. So a
  completion depends on its prompt, its seed and the model only, never on which other prompts share the
  batch, how the step's prompts were split over the ranks, or when finished rows left the batch: one
  process and several sample the same completions, and a resumed run samples what it would have. Greedy
  decoding is not offered: ``temperature`` must be > 0 (a policy-gradient update needs samples from the
  policy; ``top_k=1`` gives the argmax where a test needs it).
* A row ends at an EOS token (the tokenizer's ``eos_token_id`` and every id of the model's
  ``generation_config.eos_token_id``; the EOS is kept as the completion's last id, finish reason ``"eos"``),
  at a stop string (found in the decoded tail of the row after each token; the completion ends with the
  token that completed it and its text is cut right after the stop string, finish reason ``"stop"``), or
  after ``max_new_tokens`` tokens (finish reason ``"length"``: a truncated completion).
* Finished rows leave the batch once at least half of the batch has finished (their KV cache rows are
  dropped; see ``docs/online.md`` for the measurement that chose this over masking alone).
* The model runs in eval mode under ``torch.no_grad()``; its train/eval mode is restored afterwards.

Distributed: a DDP model generates through its inner module (no DDP hooks, no collectives). An FSDP2 model
(``fully_shard``) is unsharded once per :meth:`HFRollouts.generate` call: every FSDP module all-gathers its
parameters once, ``reshard_after_forward`` is switched off for the duration and restored afterwards, and the
parameters are resharded at the end. Decoding then needs no collective, so ranks may generate different
numbers of tokens. The cost: each rank holds a full copy of the (compute-dtype) weights while it generates.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn

#: Rows leave the batch once at most this share of it is still generating (see ``docs/online.md``).
COMPACT_WHEN_ACTIVE_SHARE = 0.5
#: Tokens of a row's tail decoded to look for a stop string, per character of the longest stop string:
#: a byte-level token holds at least one byte and a character at most four.
_TAIL_TOKENS_PER_CHAR = 4
_TAIL_EXTRA_TOKENS = 8

FINISH_REASONS = ("eos", "stop", "length")


@dataclass(frozen=True)
class SamplingOptions:
    """How completions are sampled (the option names the trainer config carries)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    num_generations: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        problems = []
        if not self.temperature > 0:
            problems.append(
                f"temperature must be > 0 (greedy decoding is not offered), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_generations < 1:
            problems.append(f"num_generations must be >= 1, got {self.num_generations}")
        for index, stop in enumerate(self.stop_strings):
            if not isinstance(stop, str) or not stop:
                problems.append(f"stop_strings[{index}] must be a non-empty string, got {stop!r}")
        if problems:
            raise ValueError("sampling options: " + "; ".join(problems))

    @classmethod
    def of(cls, options: Any, **overrides: Any) -> SamplingOptions:
        """The sampling options ``options`` carries (a trainer or an online stage's config: the same option
        names), with ``overrides`` (such as ``num_generations=2``) in place of its own."""
        names = [f.name for f in fields(cls) if f.name not in overrides]
        return cls(**{name: getattr(options, name) for name in names}, **overrides)

    @classmethod
    def greedy(cls, max_new_tokens: int, stop_strings: Sequence[str] = ()) -> SamplingOptions:
        """One answer per prompt, the most likely token at every step (``top_k`` 1)."""
        return cls(
            top_k=1, num_generations=1, max_new_tokens=max_new_tokens, stop_strings=tuple(stop_strings)
        )


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int  # position of the prompt in the batch given to generate()
    prompt_ids: list[int]
    completion_ids: list[int]  # sampled ids; ends with EOS when EOS was sampled; cut after a stop string
    text: str  # decoded completion (special tokens skipped), cut right after the stop string
    finish_reason: str  # "eos" | "stop" | "length"

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class RolloutBackend(Protocol):
    name: str

    def generate(
        self, prompts: Sequence[list[int]], options: SamplingOptions, seeds: Sequence[int]
    ) -> list[Completion]:
        """num_generations completions per prompt, grouped: completions of prompt i are contiguous,
        in prompt order. ``seeds[i]`` alone decides the random draws of prompt i's completions."""
        ...

    def sync_weights(self, model: nn.Module) -> None:
        """After an optimizer update (no-op for hf, which samples from the live model)."""
        ...


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    """Every prompt a non-empty list of int token ids; a clear error naming the first bad one."""
    if len(prompts) == 0:
        raise ValueError("generate: no prompts")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"generate: prompt {index} has no tokens")
        if not all(isinstance(token, int) and not isinstance(token, bool) for token in prompt):
            raise ValueError(f"generate: prompt {index} must be a list of int token ids")


def check_seeds(seeds: Sequence[int], prompts: Sequence[Sequence[int]]) -> None:
    """One int seed per prompt."""
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    if not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds):
        raise ValueError("generate: seeds must be ints")


def eos_token_ids(tokenizer: Any, model: nn.Module) -> frozenset[int]:
    """The tokenizer's EOS id and every EOS id of the model's generation config."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = getattr(_causal_lm(model), "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(token) for token in configured)
    return frozenset(ids)


def row_generators(seeds: Sequence[int], num_generations: int) -> list[torch.Generator]:
    """One CPU generator per row (prompt i's j-th completion), seeded from ``seeds[i]`` and ``j``."""
    generators = []
    for seed in seeds:
        for j in range(num_generations):
            digest = hashlib.sha256(f"{int(seed)}:{j}".encode()).digest()
            generators.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return generators


def draw_uniforms(generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """One uniform number in [0, 1) from each generator, as a ``(rows, 1)`` float32 tensor on ``device``."""
    values = torch.cat([torch.rand(1, generator=generator) for generator in generators])
    return values.reshape(-1, 1).to(device, non_blocking=True)


def sample_next_tokens(
    logits: torch.Tensor, options: SamplingOptions, uniforms: torch.Tensor
) -> torch.Tensor:
    """One token per row of ``logits`` (rows x vocabulary): temperature, top-k, top-p, then the inverse-CDF
    draw of each row's uniform number (``(rows, 1)``, see :func:`draw_uniforms`)."""
    logits = logits.float()
    if options.temperature != 1:
        logits = logits / options.temperature
    vocab = logits.shape[-1]
    if 0 < options.top_k < vocab:
        kth = torch.topk(logits, options.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always stays (mass_before 0)
        sorted_logits = sorted_logits.masked_fill(mass_before >= options.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Inverse-CDF draw: one uniform number per row, the first token whose cumulative probability exceeds it
    # (a token of zero probability never does). The same distribution as torch.multinomial, 10-20 times
    # faster on a CPU (see docs/online.md).
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    total = cdf[:, -1:]
    draw = uniforms.to(device=total.device, dtype=total.dtype) * total
    draw = torch.minimum(draw, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    return torch.searchsorted(cdf, draw, right=True).squeeze(-1)


@dataclass
class _Row:
    prompt_index: int
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class HFRollouts:
    """The ``hf`` rollout backend: sample from the live (possibly DDP- or FSDP2-wrapped) model.

    ``precision_autocast``: a callable returning the context every forward runs in (the trainer's
    ``Precision.autocast``), or None for none. ``eos_ids``: the ids that end a row; None (the default)
    takes them from the tokenizer and the model's generation config (an empty set ends rows only at stop
    strings and ``max_new_tokens``, as a throughput benchmark needs).
    """

    name = "hf"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        device: torch.device,
        precision_autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        *,
        eos_ids: Sequence[int] | None = None,
        compact_when_active_share: float = COMPACT_WHEN_ACTIVE_SHARE,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.autocast = precision_autocast or contextlib.nullcontext
        self.eos_ids = frozenset(eos_ids) if eos_ids is not None else eos_token_ids(tokenizer, model)
        self.compact_when_active_share = compact_when_active_share
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids, default=0)
        parameters = inspect.signature(_causal_lm(model).forward).parameters
        #: transformers 5 names the KV cache argument and output ``cache``; earlier versions
        #: ``past_key_values``.
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in parameters

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to do: generation reads the live model."""

    def generate(
        self, prompts: Sequence[list[int]], options: SamplingOptions, seeds: Sequence[int]
    ) -> list[Completion]:
        check_prompts(prompts)
        check_seeds(seeds, prompts)
        generators = row_generators(seeds, options.num_generations)
        rows = [
            _Row(prompt_index=index, prompt_ids=list(prompt))
            for index, prompt in enumerate(prompts)
            for _ in range(options.num_generations)
        ]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), gathered_for_generation(self.model):
                self._decode(rows, options, generators)
        finally:
            self.model.train(was_training)
        return [self._completion(row, options) for row in rows]

    # The decode loop ------------------------------------------------------------------------------------

    def _decode(self, rows: list[_Row], options: SamplingOptions, generators: list[torch.Generator]) -> None:
        width = max(len(row.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            attention[index, width - len(row.prompt_ids) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(input_ids, attention, positions, None)
        last_position = positions[:, -1]
        batch = list(range(len(rows)))  # row index of each batch row
        eos = self.eos_ids
        stops = options.stop_strings
        tail = _TAIL_TOKENS_PER_CHAR * max((len(s) for s in stops), default=0) + _TAIL_EXTRA_TOKENS
        for step in range(options.max_new_tokens):
            uniforms = draw_uniforms([generators[index] for index in batch], self.device)
            tokens = sample_next_tokens(logits, options, uniforms)
            active = 0
            for token, index in zip(tokens.tolist(), batch, strict=True):
                row = rows[index]
                if row.finish_reason is not None:
                    continue
                row.ids.append(token)
                if token in eos:
                    row.finish_reason = "eos"
                elif stops and self._ends_with_stop(row.ids[-tail:], stops):
                    row.finish_reason = "stop"
                elif len(row.ids) == options.max_new_tokens:
                    row.finish_reason = "length"
                else:
                    active += 1
            if active == 0 or step == options.max_new_tokens - 1:
                break
            if active <= self.compact_when_active_share * len(batch):
                keep = [b for b, index in enumerate(batch) if rows[index].finish_reason is None]
                selected = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(selected)
                attention, last_position, tokens = (
                    attention[selected],
                    last_position[selected],
                    tokens[selected],
                )
                batch = [batch[b] for b in keep]
            attention = torch.cat([attention, attention.new_ones((len(batch), 1))], dim=1)
            last_position = last_position + 1
            logits, cache = self._forward(tokens[:, None], attention, last_position[:, None], cache)

    def _forward(
        self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """The next-token logits of each row, and the KV cache."""
        kwargs: dict[str, Any] = {self._cache_name: cache}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1  # the prefill needs only the last position's logits
        with self.autocast():
            output = _inner(self.model)(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                **kwargs,
            )
        return output.logits[:, -1, :], getattr(output, self._cache_name)

    def _ends_with_stop(self, tail_ids: list[int], stops: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(tail_ids, skip_special_tokens=True)
        return any(stop in text for stop in stops)

    def _completion(self, row: _Row, options: SamplingOptions) -> Completion:
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        if row.finish_reason == "stop":
            ends = [text.find(stop) + len(stop) for stop in options.stop_strings if stop in text]
            text = text[: min(ends)] if ends else text
        if row.finish_reason not in FINISH_REASONS:
            raise AssertionError(f"row of prompt {row.prompt_index} ended without a finish reason")
        return Completion(
            prompt_index=row.prompt_index,
            prompt_ids=row.prompt_ids,
            completion_ids=row.ids,
            text=text,
            finish_reason=str(row.finish_reason),
        )


def _inner(model: nn.Module) -> nn.Module:
    """What generation calls: the model inside a DDP wrapper (no DDP hooks, no collectives), or the model
    itself (FSDP2 shards in place; its hooks find the parameters already gathered)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under the DDP and peft wrappers (whose forward signature says what it takes)."""
    inner = _inner(model)
    get_base_model = getattr(inner, "get_base_model", None)  # a peft PeftModel
    return get_base_model() if callable(get_base_model) else inner


# FSDP2 ----------------------------------------------------------------------------------------------------


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every ``fully_shard``-ed module of ``model`` (the root first), or none."""
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[None]:
    """Under FSDP2: all parameters gathered once (one all-gather per FSDP module, on every rank together),
    kept through every forward of the block, resharded at its end, and each module's
    ``reshard_after_forward`` setting restored. Anything else: nothing to do.

    FSDP2 has no public getter of ``reshard_after_forward``, so the settings are read from (and put back
    into) each module's FSDP state as torch 2.13 keeps it; ``tests/test_trainer_rollout.py`` checks that
    they come back unchanged. The root is lazily initialised first (as its first forward would), so the
    root's own default (no reshard after forward) is settled before it is saved."""
    modules = fsdp_modules(model)
    if not modules:
        yield
        return
    if modules[0] is not model:
        raise ValueError("generation under FSDP2 needs the root fully_shard module (the wrapped model)")
    modules[0]._get_fsdp_state()._lazy_init()  # type: ignore[operator]
    saved = [_reshard_settings(module) for module in modules]
    try:
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
        for module in modules:
            module.unshard()  # type: ignore[operator]
        yield
    finally:
        for module in modules:
            module.reshard()  # type: ignore[operator]
        for restore in saved:
            restore()


def _reshard_settings(module: nn.Module) -> Callable[[], None]:
    """A function that puts ``module``'s current reshard-after-forward settings back."""
    state = module._get_fsdp_state()  # type: ignore[operator]
    auto = state._auto_reshard_after_forward
    groups = [(group, group.post_forward_mesh_info) for group in state._fsdp_param_groups]

    def restore() -> None:
        state._auto_reshard_after_forward = auto
        for group, mesh_info in groups:
            group.post_forward_mesh_info = mesh_info

    return restore
