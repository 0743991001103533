"""The demo's models, built on the spot: text, tokenizer, a tiny Llama, training.

Nothing here touches the Hub. Training text is sampled from the ``builtin``
corpus, a byte-level BPE tokenizer is trained on it, a small Llama is
instantiated from a transformers config and trained by a real AdamW loop on
packed token blocks (:func:`train_causal_lm`), and checkpoints are written as
plain Hugging Face directories. The benchmarks and the tests build their
models from these pieces too.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

# Special tokens occupy the first ids, so model configs can name them without
# consulting the tokenizer.
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

MAX_POSITIONS = 2048


# --------------------------------------------------------------------------
# Text


def builtin_sample(domain: str, split: str, budget: int, seed: int) -> list[str]:
    """A seeded random sample of ``domain`` documents of ``split``, about
    ``budget`` characters in all (the whole corpus would take minutes to
    train on and to score)."""
    from mergekit_aim.calibration.builtin import builtin_documents

    texts = [doc.text for doc in builtin_documents(domains=[domain], split=split)]
    random.Random(f"{seed}-{domain}-{split}").shuffle(texts)
    chosen, size = [], 0
    for text in texts:
        if size >= budget:
            break
        chosen.append(text)
        size += len(text)
    if not chosen:
        raise RuntimeError(f"the builtin corpus has no {split} {domain} text")
    return chosen


# --------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    split_digits: bool = False,
    chat_template: str | None = None,
) -> Any:
    """Train a byte-level BPE tokenizer and wrap it as a fast HF tokenizer.

    Ids 0–3 are ``<pad> <s> </s> <unk>``. Encoding prepends ``<s>`` (a
    template post-processor), so ``tokenizer(text)["input_ids"][0] == BOS_ID``
    without ``add_special_tokens=False``. Byte-level BPE is what transformers 5
    rebuilds for Llama, Qwen2 and GPT-2 checkpoints from the saved vocabulary
    and merges, so text encodes sensibly whichever tokenizer class a loader
    picks. With ``split_digits`` every digit is its own token (numbers are
    never merged), which makes arithmetic learnable for tiny models.
    ``chat_template`` (Jinja) is stored on the tokenizer when given.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        core.pre_tokenizer = byte_level
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MAX_POSITIONS,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# --------------------------------------------------------------------------
# Model


def attention_heads(hidden_size: int) -> int:
    """The most attention heads (at most 8) that leave a head dim of ≥ 16."""
    for heads in (8, 4, 2, 1):
        if hidden_size % heads == 0 and hidden_size // heads >= 16:
            return heads
    return 1


def vocabulary_settings(vocab_size: int) -> dict[str, int]:
    """Config fields naming the vocabulary and the special token ids above."""
    return dict(
        vocab_size=vocab_size,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def decoder_settings(hidden_size: int, num_layers: int) -> dict[str, int]:
    """The decoder shape of a tiny Llama (config fields in Llama's naming)."""
    heads = attention_heads(hidden_size)
    return dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=MAX_POSITIONS,
    )


def llama_config(
    vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, **overrides: Any
) -> Any:
    """The ``LlamaConfig`` of a tiny Llama: linear weights ``[out, in]``,
    RMSNorm, untied LM head. ``overrides`` are config attributes and win."""
    from transformers import LlamaConfig

    settings = {
        **vocabulary_settings(vocab_size),
        **decoder_settings(hidden_size, num_layers),
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**{**settings, **overrides})


def init_model(config: Any, *, seed: int = 0) -> Any:
    """A randomly initialised float32 causal LM of ``config``, in eval mode.

    The same config and seed give bit-identical weights; the global RNG state
    is left as it was.
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    **overrides: Any,
) -> Any:
    """:func:`init_model` of :func:`llama_config`."""
    config = llama_config(
        vocab_size, hidden_size=hidden_size, num_layers=num_layers, **overrides
    )
    return init_model(config, seed=seed)


def save_checkpoint(
    model: Any, tokenizer: Any, path: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """Write ``model`` (safetensors, config, generation config) and ``tokenizer``.

    With ``dtype`` the weights are stored in that dtype; ``model`` itself is
    not modified. Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------
# Training


def token_stream(tokenizer: Any, texts: Iterable[str]) -> torch.Tensor:
    """All ``texts`` tokenized (each with the tokenizer's own BOS) and joined by EOS."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(
    tokenizer: Any,
    texts: Iterable[str],
    seq_len: int,
    *,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """The :func:`token_stream` of ``texts`` cut into ``[num_blocks, seq_len]``
    by calibration's packer (remainder dropped; with ``bos_token_id`` every
    block starts with exactly that one token)."""
    from mergekit_aim.calibration.data import pack_blocks

    stream = token_stream(tokenizer, texts).tolist()
    return pack_blocks([stream], seq_len, bos_token_id=bos_token_id)


def train_causal_lm(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    steps: int,
    seq_len: int = 128,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    autocast: torch.dtype | None = None,
    bos_token_id: int | None = None,
) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps; returns each step's loss.

    Data: ``texts`` packed into ``seq_len`` blocks (:func:`token_blocks`),
    visited in seeded random order, epoch after epoch. Optimizer and schedule
    are :func:`run_training`'s. The model is left in eval mode. Raises
    ``ValueError`` when the texts do not fill one block. ``autocast``: run
    forward and backward under CPU autocast to that dtype (float32 master
    weights and optimizer). ``bos_token_id``: every block starts with it
    (models such as Gemma-3 that expect one at the start of every sequence).
    """
    data = token_blocks(tokenizer, texts, seq_len, bos_token_id=bos_token_id)
    if data.shape[0] == 0:
        raise ValueError(f"the texts give fewer than seq_len={seq_len} tokens")
    draw = shuffled_batches(len(data), batch_size, seed)

    def next_batch() -> dict[str, torch.Tensor]:
        batch = data[draw()]
        return {"input_ids": batch, "labels": batch}

    return run_training(model, next_batch, steps=steps, lr=lr, autocast=autocast)


def shuffled_batches(
    size: int, batch_size: int, seed: int
) -> Callable[[], torch.Tensor]:
    """A function returning the next ``batch_size`` indices of seeded epochs."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)

    def draw() -> torch.Tensor:
        nonlocal order
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(size, generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        return index

    return draw


def run_training(
    model: Any,
    next_batch: Callable[[], Any],
    *,
    steps: int,
    lr: float,
    autocast: torch.dtype | None = None,
) -> list[float]:
    """``steps`` AdamW steps on ``model`` in place; returns each step's loss.

    ``next_batch()`` gives the model's keyword arguments, or a list of them
    whose losses are summed. The learning rate warms up linearly over the first
    10% of steps and decays by a cosine to 10% of ``lr``: short runs need both
    to be stable at a high rate. Gradients are clipped to norm 1. The model is
    left in eval mode.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses: list[float] = []
    model.train()
    try:
        for _ in range(steps):
            batches = next_batch()
            if isinstance(batches, dict):
                batches = [batches]
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = sum(model(**batch).loss for batch in batches)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
    return losses
