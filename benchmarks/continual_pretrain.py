"""Pre-train the continual-learning benchmark's base model on the synthetic corpus, cached by its hash.

A tiny Qwen2 model (:mod:`kfp_components.testing.tiny_model`: random weights, a locally trained tokenizer)
is trained as a language model on :func:`benchmarks.continual_corpus.corpus`: documents as plain text, task
family conversations rendered with the model's chat template, every token trained (pre-training, not SFT).
The samples are tokenized, joined with the end-of-text token into one stream and cut into rows of
``row_tokens``; AdamW with warmup and cosine decay, on one thread (the machine is shared), float32.

The result is a standard Hugging Face folder under ``benchmarks/results/continual_pretrained/<key>/`` where
``<key>`` hashes the :class:`PretrainConfig`, the source of the corpus generator and of this module, and the
torch/transformers versions: a change to any of them trains a new model, an unchanged setup reuses it.
``pretrain.json`` beside the weights records the loss curve, the held-out perplexity and the time it took.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import continual_corpus
from kfp_components.testing.tiny_model import build_tiny_model

CACHE = Path(__file__).resolve().parent / "results" / "continual_pretrained"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pre-trained model."""

    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 384
    init_seed: int = 0
    world_seed: int = 0
    corpus_seed: int = 1
    corpus_samples: int = 24_000
    chat_share: float = 0.5
    row_tokens: int = 256
    rows_per_step: int = 16
    steps: int = 400
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    #: Held-out samples (a different seed, the same world) for perplexity.
    heldout_seed: int = 2
    heldout_samples: int = 400

    @property
    def model(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "intermediate_size": self.intermediate_size,
        }

    def describe(self) -> str:
        return (
            f"qwen2, hidden {self.hidden_size}, {self.num_layers} layers, "
            f"MLP {self.intermediate_size}, vocabulary 1,024"
        )

    def cache_key(self) -> str:
        payload = {
            "config": dataclasses.asdict(self),
            "generator": inspect.getsource(continual_corpus),
            "pretrain": [inspect.getsource(f) for f in (_sample_ids, token_rows, _train_lm, pretrain)],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _sample_ids(tokenizer: Any, sample: continual_corpus.Sample) -> list[int]:
    if sample.messages is not None:
        text = tokenizer.apply_chat_template(sample.messages, tokenize=False)
    else:
        text = sample.text or ""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.pad_token_id]


def token_rows(tokenizer: Any, samples: list[continual_corpus.Sample], row_tokens: int) -> torch.Tensor:
    """The samples as one stream (each ends with the end-of-text token), cut into full rows."""
    stream = [token for sample in samples for token in _sample_ids(tokenizer, sample)]
    rows = len(stream) // row_tokens
    return torch.tensor(stream[: rows * row_tokens]).view(rows, row_tokens)


def heldout_rows(tokenizer: Any, config: PretrainConfig) -> torch.Tensor:
    world = continual_corpus.make_world(config.world_seed)
    samples = continual_corpus.corpus(config.heldout_seed, config.heldout_samples, world, config.chat_share)
    return token_rows(tokenizer, samples, config.row_tokens)


@torch.no_grad()
def perplexity(model: Any, rows: torch.Tensor, batch: int = 16) -> float:
    """exp(mean next-token NLL) over every predicted token of ``rows``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        logits = model(chunk).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + float(nll), count + chunk[:, 1:].numel()
    return math.exp(total / count)


def _train_lm(model: Any, rows: torch.Tensor, config: PretrainConfig) -> list[float]:
    """AdamW, linear warmup then cosine decay; returns the training loss every 10 steps."""
    generator = torch.Generator().manual_seed(config.init_seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95)
    )

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    order = torch.randperm(len(rows), generator=generator)
    cursor = 0
    for step in range(config.steps):
        if cursor + config.rows_per_step > len(order):
            order, cursor = torch.randperm(len(rows), generator=generator), 0
        batch = rows[order[cursor : cursor + config.rows_per_step]]
        cursor += config.rows_per_step
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == config.steps - 1:
            losses.append(round(float(loss.detach()), 4))
    model.eval()
    return losses


def pretrain(config: PretrainConfig, out_dir: Path) -> dict[str, Any]:
    """Train the base model into ``out_dir`` (a HF folder with ``pretrain.json``); returns its record."""
    started = time.perf_counter()
    torch.manual_seed(config.init_seed)
    random.seed(config.init_seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_model(Path(tmp) / "init", arch="qwen2", seed=config.init_seed, **config.model)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    world = continual_corpus.make_world(config.world_seed)
    rows = token_rows(
        tokenizer,
        continual_corpus.corpus(config.corpus_seed, config.corpus_samples, world, config.chat_share),
        config.row_tokens,
    )
    heldout = heldout_rows(tokenizer, config)
    initial_ppl = perplexity(model, heldout)
    losses = _train_lm(model, rows, config)
    record = {
        "key": config.cache_key(),
        "config": dataclasses.asdict(config),
        "train_tokens": config.steps * config.rows_per_step * config.row_tokens,
        "corpus_tokens": rows.numel(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "losses_every_10_steps": losses,
        "heldout_perplexity_initial": round(initial_ppl, 2),
        "heldout_perplexity": round(perplexity(model, heldout), 3),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def pretrained_model(config: PretrainConfig, cache: Path = CACHE) -> tuple[Path, dict[str, Any]]:
    """The cached pre-trained model for ``config`` (trained first when absent): its folder and record."""
    folder = cache / config.cache_key()
    if (folder / "pretrain.json").exists():
        return folder, json.loads((folder / "pretrain.json").read_text())
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache))
    try:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            record = pretrain(config, partial)
        finally:
            torch.set_num_threads(previous_threads)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder, record
