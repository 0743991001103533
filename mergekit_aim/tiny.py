"""Tiny real Hugging Face checkpoints, built locally (tests, demo, benchmarks).

Nothing here touches the Hub. A byte-level BPE tokenizer is trained on the
caller's text, models of three families with different weight layouts are
instantiated from transformers configs, and two ways of making "fine-tuned"
variants exist: :func:`finetune_variant` (a seeded weight perturbation, cheap,
for tests that only need different tensors) and :func:`train_causal_lm` (a
real AdamW loop on packed token blocks, for the demo and benchmarks).

Families and the layouts they exercise:

* ``llama``: ``LlamaForCausalLM``, linear weights ``[out, in]``, RMSNorm,
  untied LM head.
* ``qwen2``: ``Qwen2ForCausalLM``, q/k/v biases, LM head tied to the embedding.
* ``gpt2``: ``GPT2LMHeadModel``, ``Conv1D`` weights stored ``[in, out]``,
  LayerNorm with biases, tied LM head.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LOG = logging.getLogger(__name__)

FAMILIES = ("llama", "qwen2", "gpt2")

# Special tokens occupy the first ids, so model configs can name them without
# consulting the tokenizer.
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

# Roles are written as plain text markers so that rendering a conversation
# needs nothing beyond the four special tokens. Like Llama's templates it
# places BOS itself: rendered chats are tokenized without special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_MAX_POSITIONS = 2048


# --------------------------------------------------------------------------
# Text


# Phrase lists, '|'-separated to keep them compact.
_SUBJECTS = tuple(
    (
        "the farmer|a small child|the old teacher|my neighbour|the captain|"
        "a quiet student|the baker|her brother|the doctor|a tired painter|"
        "the river|the city council|a young fox|the wind|our team"
    ).split("|")
)

_VERBS = tuple(
    (
        "carried|found|painted|watched|borrowed|repaired|followed|opened|"
        "described|planted|counted|remembered|sold|cleaned"
    ).split("|")
)

_OBJECTS = tuple(
    (
        "a wooden box|the green door|three apples|an old map|the long road|"
        "a broken clock|the morning bread|a letter|the red kite|two stones|"
        "the garden gate|a heavy coat|the last train|a bright lamp"
    ).split("|")
)

_PLACES = tuple(
    (
        "near the market|by the sea|in the forest|after the storm|"
        "before dinner|under the bridge|at the station|on a cold morning|"
        "during the festival|behind the school|across the valley"
    ).split("|")
)

_ENDINGS = tuple(
    (
        "and smiled|without a word|for the first time|because it was late|"
        "while the bells rang|and then went home|with great care|again"
    ).split("|")
)


def generate_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` short English-like sentences, the same for the same seed.

    Built from fixed word lists; every sentence has a subject, verb, object and
    a place, and some have an ending, so a tokenizer trained on them sees
    recurring words and a few hundred of them give thousands of tokens.
    """
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = [
            rng.choice(_SUBJECTS),
            rng.choice(_VERBS),
            rng.choice(_OBJECTS),
            rng.choice(_PLACES),
        ]
        if rng.random() < 0.5:
            words.append(rng.choice(_ENDINGS))
        sentence = " ".join(words)
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
    return sentences


# --------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, *, split_digits: bool = False
) -> Any:
    """Train a byte-level BPE tokenizer and wrap it as a fast HF tokenizer.

    Ids 0–3 are ``<pad> <s> </s> <unk>``. Encoding prepends ``<s>`` (a
    template post-processor), so ``tokenizer(text)["input_ids"][0] == BOS_ID``
    without ``add_special_tokens=False``. A Jinja ``chat_template`` renders
    ``messages`` as ``<s>`` then ``<|role|>`` lines closed by ``</s>``.
    Byte-level BPE is what transformers 5 rebuilds for Qwen2/GPT-2 checkpoints
    from the saved vocabulary and merges, so text encodes sensibly whichever
    tokenizer class a family's loader picks. With ``split_digits`` every digit
    is its own token (numbers are never merged), which makes arithmetic
    learnable for tiny models.
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
        model_max_length=_MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------
# Models


def _heads(hidden_size: int) -> int:
    """The most attention heads (at most 8) that leave a head dim of ≥ 16."""
    for heads in (8, 4, 2, 1):
        if hidden_size % heads == 0 and hidden_size // heads >= 16:
            return heads
    return 1


def tiny_config(
    family: str,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    **overrides: Any,
) -> Any:
    """The transformers config of a tiny model of ``family`` (see module doc).

    ``overrides`` are config attributes in the family's own naming (``n_inner``
    for GPT-2, ``intermediate_size`` for the others, …) and win over defaults.
    """
    heads = _heads(hidden_size)
    common = dict(
        vocab_size=vocab_size,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    # Llama and Qwen2 share one decoder shape; Qwen2 adds biases (its own
    # architecture) and ties its embeddings.
    decoder = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=_MAX_POSITIONS,
    )
    if family == "llama":
        from transformers import LlamaConfig

        settings = dict(decoder, tie_word_embeddings=False)
        return LlamaConfig(**{**common, **settings, **overrides})
    if family == "qwen2":
        from transformers import Qwen2Config

        settings = dict(decoder, tie_word_embeddings=True, use_sliding_window=False)
        return Qwen2Config(**{**common, **settings, **overrides})
    if family == "gpt2":
        from transformers import GPT2Config

        settings = dict(
            n_embd=hidden_size,
            n_inner=2 * hidden_size,
            n_layer=num_layers,
            n_head=heads,
            n_positions=_MAX_POSITIONS,
            tie_word_embeddings=True,
            # No dropout: training and evaluation must be reproducible.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return GPT2Config(**{**common, **settings, **overrides})
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def tiny_model(
    family: str,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    **overrides: Any,
) -> Any:
    """A randomly initialised float32 causal LM of ``family``, in eval mode.

    The same arguments give bit-identical weights; the global RNG state is
    left as it was.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        family, vocab_size, hidden_size=hidden_size, num_layers=num_layers, **overrides
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


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


def finetune_variant(model: Any, *, seed: int, scale: float) -> Any:
    """A copy of ``model`` with every parameter perturbed by seeded noise.

    Each parameter moves by ``scale · max(rms(p), 0.02) · N(0, 1)``: relative to
    its own size, with a floor so zero-initialised biases move too. Tied
    parameters are perturbed once and stay tied. A stand-in for fine-tuning
    where only distinct, reproducible weights matter.
    """
    variant = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in variant.parameters():
            magnitude = max(param.detach().float().pow(2).mean().sqrt().item(), 0.02)
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_((scale * magnitude * noise).to(param.dtype))
    return variant


@dataclass(frozen=True)
class TinyFamily:
    """A base checkpoint and its perturbed variants, all on disk."""

    family: str
    base: Path
    finetunes: tuple[Path, ...]
    tokenizer: Any


def build_family(
    family: str,
    root: str | Path,
    tokenizer: Any,
    *,
    num_finetunes: int = 2,
    scale: float = 0.1,
    seed: int = 0,
    **model_kwargs: Any,
) -> TinyFamily:
    """Write ``root/base`` and ``root/ft_a``, ``root/ft_b``, … (float32).

    The base is ``tiny_model(family, len(tokenizer), seed=seed, **model_kwargs)``;
    variant ``i`` is :func:`finetune_variant` of it with seed ``seed + 1 + i``.
    """
    root = Path(root)
    base = tiny_model(family, len(tokenizer), seed=seed, **model_kwargs)
    base_path = save_checkpoint(base, tokenizer, root / "base")
    finetunes = []
    for i in range(num_finetunes):
        variant = finetune_variant(base, seed=seed + 1 + i, scale=scale)
        name = f"ft_{chr(ord('a') + i)}"
        finetunes.append(save_checkpoint(variant, tokenizer, root / name))
    return TinyFamily(family, base_path, tuple(finetunes), tokenizer)


# --------------------------------------------------------------------------
# Training and evaluation


def token_stream(tokenizer: Any, texts: Iterable[str]) -> torch.Tensor:
    """All ``texts`` tokenized (each with the tokenizer's own BOS) and joined by EOS."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def pack_blocks(
    tokenizer: Any, texts: Iterable[str], seq_len: int, *, keep_remainder: bool = False
) -> list[torch.Tensor]:
    """The token stream of ``texts`` cut into consecutive ``seq_len`` blocks.

    The remainder is dropped unless ``keep_remainder`` (then it is a shorter
    last block, kept only if it has at least two tokens to predict from).
    """
    stream = token_stream(tokenizer, texts)
    blocks = list(torch.split(stream, seq_len))
    if blocks and blocks[-1].numel() < seq_len:
        tail = blocks.pop()
        if keep_remainder and tail.numel() >= 2:
            blocks.append(tail)
    return blocks


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
) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps; returns each step's loss.

    Data: ``texts`` packed into ``seq_len`` blocks (remainder dropped), visited
    in seeded random order, epoch after epoch. The learning rate warms up
    linearly over the first 10% of steps and decays by a cosine to 10% of
    ``lr``: short runs need both to be stable at a high rate. Gradients are
    clipped to norm 1. The model is left in eval mode. Raises ``ValueError``
    when the texts do not fill one block. ``autocast``: run forward and backward
    under CPU autocast to that dtype (float32 master weights and optimizer).
    """
    blocks = pack_blocks(tokenizer, texts, seq_len)
    if not blocks:
        raise ValueError(f"the texts give fewer than seq_len={seq_len} tokens")
    data = torch.stack(blocks)
    draw = _shuffled_batches(len(data), batch_size, seed)

    def next_batch() -> dict[str, torch.Tensor]:
        batch = data[draw()]
        return {"input_ids": batch, "labels": batch}

    return _train(model, next_batch, steps=steps, lr=lr, autocast=autocast)


def train_completions(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    replay: Sequence[str] = (),
    replay_batch_size: int = 8,
    replay_seq_len: int = 128,
    autocast: torch.dtype | None = None,
) -> list[float]:
    """Supervised fine-tuning on ``(prompt, completion)`` pairs, in place.

    Each example is ``<s> prompt completion </s>``; only the completion and
    ``</s>`` are scored (prompt tokens are masked out of the loss, as in
    instruction tuning). Batches of ``batch_size`` examples are drawn in seeded
    random order and right-padded; optimizer and schedule as
    :func:`train_causal_lm`. ``prompt + completion`` must tokenize with the
    prompt's tokens as a prefix. With ``replay`` texts, every step adds the
    language-model loss of ``replay_batch_size`` packed blocks of them (replay
    of pre-training data, which keeps the model from forgetting it). Returns
    each step's loss (the sum of both terms). ``autocast`` as in
    :func:`train_causal_lm`.
    """
    rows = []
    for prompt, completion in pairs:
        head = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
        if full[: len(head)] != head:
            raise ValueError(f"prompt {prompt!r} is not a token prefix of its example")
        rows.append((full, len(head)))
    if not rows:
        raise ValueError("no training pairs")
    draw = _shuffled_batches(len(rows), batch_size, seed)

    def next_batch() -> dict[str, torch.Tensor]:
        chosen = [rows[i] for i in draw().tolist()]
        width = max(len(ids) for ids, _ in chosen)
        input_ids = torch.full((len(chosen), width), tokenizer.pad_token_id)
        labels = torch.full((len(chosen), width), -100)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for i, (ids, start) in enumerate(chosen):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, start : len(ids)] = torch.tensor(ids[start:])
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    if not replay:
        return _train(model, next_batch, steps=steps, lr=lr, autocast=autocast)
    blocks = pack_blocks(tokenizer, replay, replay_seq_len)
    if not blocks:
        raise ValueError(f"the replay texts give fewer than {replay_seq_len} tokens")
    replay_data = torch.stack(blocks)
    draw_replay = _shuffled_batches(len(replay_data), replay_batch_size, seed + 1)

    def next_batches() -> list[dict[str, torch.Tensor]]:
        batch = replay_data[draw_replay()]
        return [next_batch(), {"input_ids": batch, "labels": batch}]

    return _train(model, next_batches, steps=steps, lr=lr, autocast=autocast)


def _shuffled_batches(size: int, batch_size: int, seed: int) -> Any:
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


def _train(
    model: Any,
    next_batch: Any,
    *,
    steps: int,
    lr: float,
    autocast: torch.dtype | None = None,
) -> list[float]:
    """AdamW with warm-up and cosine decay; ``next_batch()`` gives the model's
    keyword arguments, or a list of them whose losses are summed."""
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


@torch.no_grad()
def heldout_loss(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int = 128,
    batch_size: int = 8,
) -> float:
    """Mean next-token negative log-likelihood (nats) over ``texts``.

    The texts are packed like training data, the shorter last block included,
    and every predicted token counts once. Deterministic: eval mode, no
    gradient, fixed order. The model's train/eval mode is restored.
    """
    blocks = pack_blocks(tokenizer, texts, seq_len, keep_remainder=True)
    if not blocks:
        raise ValueError("the texts give fewer than two tokens")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        full = [b for b in blocks if b.numel() == seq_len]
        batches = [
            torch.stack(full[i : i + batch_size])
            for i in range(0, len(full), batch_size)
        ]
        batches += [b[None] for b in blocks if b.numel() != seq_len]
        for batch in batches:
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    reduction="sum",
                )
            )
            count += targets.numel()
    finally:
        model.train(was_training)
    return total / count
