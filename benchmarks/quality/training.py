"""The benchmark's models: a base and three experts fine-tuned from it.

Two scales. With a real model (``Settings.model``, e.g. ``smollm2-135m``) the
base is that pretrained checkpoint, provisioned offline by
:mod:`benchmarks.real_models`, and each expert is the whole model fully
fine-tuned on one task on the CPU (bf16 autocast, float32 weights, stored in
float32 so that small task vectors survive); nothing replays general text,
so the experts forget what fine-tuning pushes out, as real fine-tunes do.
Its calibration uses ``builtin``'s *train* split only, so that no calibration
text is evaluated on.

At toy scale the base is a small Llama trained on ``builtin``'s mixed training split
(prose, code, math, interleaved). Each expert is the base fine-tuned on one
task only: ``code`` on ``builtin`` code (language-model loss), ``math`` and
``instructions`` on their generated training items (supervised fine-tuning:
loss on the answer only, as in instruction tuning, plus the language-model
loss on a replayed batch of the base's training text at every step, so that
these experts, like real fine-tuned models, keep most of what the base
knew). The base is then calibrated on ``builtin`` (task-agnostic; the
paper's protocol with the offline corpus). Everything is cached under a
directory named by a hash of the settings and the corpus fingerprint, so a
second run only merges and scores.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.quality import tasks
from benchmarks.quality.tasks import Item, ItemSplits

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)

# Bump when training or data rules change: cached models are then rebuilt.
_CACHE_VERSION = 1
CALIBRATION_SEED = 42


@dataclass(frozen=True)
class Settings:
    """Model size, training budget, data sizes and merge grid of one run."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    seq_len: int
    batch_size: int
    base_steps: int
    base_lr: float
    base_chars: int
    code_steps: int
    code_lr: float
    item_steps: int
    item_lr: float
    item_batch_size: int
    replay_batch_size: int
    code_chars: int
    train_items: int
    validation_items: int
    test_items: int
    heldout_chars: int
    validation_chars: int
    calibration_samples: int
    density: float
    dare_seeds: tuple[int, ...]
    omega: float
    sweep_omegas: tuple[float, ...]
    tune_omegas: tuple[float, ...]
    greedy_check_items: int
    seed: int = 0
    # A real pretrained base from benchmarks.real_models; None: train a toy.
    model: str | None = None
    methods: tuple[str, ...] = ("task_arithmetic", "ties", "dare_ties", "dare_linear")
    # Expert sets merged besides the triple; None: every pair.
    pairs: tuple[tuple[str, ...], ...] | None = None
    # The dtype models are scored in (bf16 is ~3.5x faster on AVX512-BF16 CPUs).
    eval_dtype: str = "float32"
    calibration_split: str = "all"
    # How tasks are scored: "teacher-forced" (one pass: exact-match verdicts and
    # block NLL, the toy scales) or "lm-eval" (lm-evaluation-harness on the
    # task YAMLs: greedy generation and bits per byte, the real models).
    scorer: str = "teacher-forced"
    # tune's split grid (attention/other ω × MLP ω); empty: no tuned-split rows.
    split_omegas: tuple[float, ...] = ()
    # Skill floors of the tuned rows (lm-eval scoring): how far below the plain
    # merge on the validation split a merged expert's task may fall (exact
    # match as a fraction; bits per byte).
    keep: tuple[tuple[str, float], ...] = (
        ("code", 0.01),
        ("math", 0.0),
        ("instructions", 0.0),
    )
    # Training seeds of the experts (real models): each seed fine-tunes its
    # own three experts from the base on the same data in its own batch order,
    # and a merge's row ``seed`` is its experts' seed. Empty: ``seed`` only,
    # and a row's ``seed`` is the DARE seed.
    expert_seeds: tuple[int, ...] = ()
    # Parameters that expert training leaves frozen, by name. Gemma-3's tied
    # embedding (262k rows): AdamW moves every row by ~lr a step however small
    # its gradient. Freezing it was tried as a cure for the item experts'
    # forgetting and is not one (their general bits per byte rise from 1.27 to
    # 2.6-3.1 either way); it stays because the Gemma report was run with it.
    frozen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.expert_seeds and not self.model:
            # A toy base is trained with the seed too: its seeds would not
            # share the base their merges are relaxed toward.
            raise ValueError("expert_seeds needs a real pretrained base (model)")
        if len(self.expert_seeds) > 1 and set(self.methods) & {
            "dare_ties",
            "dare_linear",
        }:
            raise ValueError(
                "expert_seeds and DARE methods both claim a row's seed; use one of them"
            )

    def for_seed(self, seed: int) -> Settings:
        """The settings that train the experts of training seed ``seed``."""
        return replace(self, seed=seed, expert_seeds=())

    def training_seeds(self) -> tuple[int, ...]:
        return self.expert_seeds or (self.seed,)

    def training_key(self) -> str:
        """Hash of everything that determines the trained models."""
        from mergekit_aim.calibration.builtin import builtin_fingerprint

        fields = {
            k: v
            for k, v in asdict(self).items()
            if k
            not in (
                "heldout_chars",
                "validation_chars",
                "density",
                "dare_seeds",
                "omega",
                "sweep_omegas",
                "tune_omegas",
                "greedy_check_items",
                "methods",
                "pairs",
                "eval_dtype",
                "scorer",
                "split_omegas",
                "keep",
                "expert_seeds",
            )
        }
        if not self.frozen:
            del fields["frozen"]  # added later: absent, it keeps older keys
        fields["corpus"] = builtin_fingerprint()
        fields["version"] = _CACHE_VERSION
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


OMEGAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

FULL = Settings(
    vocab_size=1024,
    hidden_size=128,
    num_layers=4,
    seq_len=128,
    batch_size=16,
    base_steps=400,
    base_lr=3e-3,
    base_chars=600_000,
    code_steps=300,
    code_lr=1e-3,
    item_steps=500,
    item_lr=2e-3,
    item_batch_size=64,
    replay_batch_size=8,
    code_chars=300_000,
    train_items=6000,
    validation_items=60,
    test_items=200,
    heldout_chars=15_000,
    validation_chars=8_000,
    calibration_samples=128,
    density=0.5,
    dare_seeds=(0, 1, 2),
    omega=0.4,
    sweep_omegas=OMEGAS,
    tune_omegas=OMEGAS,
    greedy_check_items=40,
)
# The real-model runs: the base is pretrained, so only experts are trained.
# Sized for two CPU cores: a fine-tuning step of 32 items or 16 x 128 tokens
# takes 1.5-4 s with bf16 autocast, scoring one model through lm-eval 30-50 s.
_SMOLLM2 = Settings(
    vocab_size=0,
    hidden_size=0,
    num_layers=0,
    seq_len=128,
    batch_size=16,
    base_steps=0,
    base_lr=0.0,
    base_chars=0,
    code_steps=60,
    code_lr=5e-5,
    item_steps=60,
    item_lr=1e-4,
    item_batch_size=32,
    replay_batch_size=0,
    code_chars=300_000,
    train_items=3000,
    validation_items=40,
    test_items=200,
    heldout_chars=16_000,
    validation_chars=4_000,
    calibration_samples=128,
    density=0.5,
    dare_seeds=(0, 1),
    omega=0.4,
    sweep_omegas=(0.0, 0.4),
    tune_omegas=(0.0, 0.2, 0.4, 0.6, 1.0),
    greedy_check_items=20,
    model="smollm2-135m",
    methods=("task_arithmetic", "ties", "dare_ties"),
    pairs=(("code", "math"),),
    eval_dtype="bfloat16",
    calibration_split="train",
    scorer="lm-eval",
    split_omegas=(0.0, 0.4, 1.0),
)
REAL = {
    "smollm2-135m": _SMOLLM2,
    # Gemma-3-270M: a training step costs ~4x SmolLM2's on these CPUs (its
    # 262k-word vocabulary, 63% of the parameters, is in every step), so its
    # experts see fewer, shorter batches, with the tied embedding frozen (see
    # Settings.frozen); two training seeds instead of DARE seeds; the triple
    # only, without the ω sweep and the split grid. SmolLM2's learning rates
    # make Gemma's item experts forget far more than SmolLM2's (the report
    # says so); they are kept so that both runs share their learning rates.
    "gemma3-270m": replace(
        _SMOLLM2,
        model="gemma3-270m",
        seq_len=64,
        batch_size=8,
        code_steps=40,
        item_steps=60,
        item_batch_size=16,
        dare_seeds=(0,),
        sweep_omegas=(),
        methods=("task_arithmetic", "ties"),
        pairs=(),
        split_omegas=(),
        expert_seeds=(0, 1),
        frozen=("model.embed_tokens.weight",),
    ),
}
QUICK = Settings(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    seq_len=128,
    batch_size=16,
    base_steps=80,
    base_lr=3e-3,
    base_chars=150_000,
    code_steps=60,
    code_lr=2e-3,
    item_steps=100,
    item_lr=3e-3,
    item_batch_size=64,
    replay_batch_size=8,
    code_chars=100_000,
    train_items=2000,
    validation_items=40,
    test_items=100,
    heldout_chars=6_000,
    validation_chars=3_000,
    calibration_samples=32,
    density=0.5,
    dare_seeds=(0,),
    omega=0.4,
    sweep_omegas=(0.0, 0.4, 1.0),
    tune_omegas=(0.0, 0.4, 1.0),
    greedy_check_items=10,
)
# Every stage at the smallest size that still runs it (seconds): what CI runs
# so that a name the benchmark uses cannot move without a test failing.
SMOKE = Settings(
    vocab_size=300,
    hidden_size=32,
    num_layers=1,
    seq_len=32,
    batch_size=4,
    base_steps=2,
    base_lr=3e-3,
    base_chars=6_000,
    code_steps=2,
    code_lr=2e-3,
    item_steps=2,
    item_lr=3e-3,
    item_batch_size=4,
    replay_batch_size=2,
    code_chars=3_000,
    train_items=20,
    validation_items=4,
    test_items=6,
    heldout_chars=800,
    validation_chars=400,
    calibration_samples=4,
    density=0.5,
    dare_seeds=(0,),
    omega=0.4,
    sweep_omegas=(0.0, 1.0),
    tune_omegas=(0.0, 1.0),
    greedy_check_items=2,
    methods=("task_arithmetic",),
    pairs=(("code", "math"),),
)


@dataclass
class TaskData:
    """Every split of every task (items for exact match, texts for losses)."""

    items: dict[str, ItemSplits]
    code_train: list[str]
    base_train: list[str]
    validation_texts: dict[str, list[str]]
    test_texts: dict[str, list[str]]

    def validation(self, task: str) -> list[str]:
        """Held-out texts of ``task`` for choosing ω (never the test split)."""
        if task in self.items:
            return [item.text for item in self.items[task].validation]
        return self.validation_texts[task]

    def test_items(self, task: str) -> tuple[Item, ...]:
        return self.items[task].test


def build_data(settings: Settings) -> TaskData:
    """Generate and sample every split; deterministic for the settings."""
    from mergekit_aim.demo.models import builtin_sample

    seed = settings.seed
    split = dict(
        train=settings.train_items,
        validation=settings.validation_items,
        test=settings.test_items,
    )
    items = {
        "math": tasks.item_splits(tasks.math_item, seed=seed + 101, **split),
        "instructions": tasks.item_splits(
            tasks.instruction_item, seed=seed + 202, **split
        ),
    }
    per_domain = settings.base_chars // 3
    base_parts = [
        builtin_sample(d, "train", per_domain, seed) if per_domain else []
        for d in ("prose", "code", "math")
    ]
    # Interleave domains so the base sees all three from the start.
    base_train = [t for group in itertools.zip_longest(*base_parts) for t in group if t]
    code_train = builtin_sample("code", "train", settings.code_chars, seed + 1)
    validation_texts, test_texts = {}, {}
    for task, domain in (("code", "code"), ("general", "prose")):
        from mergekit_aim.calibration.builtin import builtin_documents

        heldout = [d.text for d in builtin_documents(domains=[domain], split="heldout")]
        validation, test = tasks.text_splits(
            heldout,
            validation=settings.validation_chars,
            test=settings.heldout_chars,
            seed=seed + 303,
        )
        validation_texts[task], test_texts[task] = validation, test
    return TaskData(items, code_train, base_train, validation_texts, test_texts)


@dataclass(frozen=True)
class Models:
    """Paths of the trained checkpoints and the base's importance artifact."""

    root: Path
    base: Path
    experts: dict[str, Path]
    importance: Path
    tokenizer: Any
    log: dict[str, Any]


def build_models(settings: Settings, data: TaskData, cache_dir: Path) -> Models:
    """Train (or load from ``cache_dir``) the base, the experts and the artifact.

    Resumable: each stage (base, each expert, the artifact) is written whole
    and marked done before the next starts, so an interrupted run redoes only
    the unfinished stage.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_aim.demo import models as demo_models

    root = Path(cache_dir) / f"models-{settings.training_key()}"
    root.mkdir(parents=True, exist_ok=True)
    experts = {t: root / f"expert_{t}" for t in tasks.EXPERT_TASKS}
    log_path = root / "training.json"
    log: dict[str, Any] = (
        json.loads(log_path.read_text())
        if log_path.exists()
        else {"settings": asdict(settings)}
    )

    clock = [time.perf_counter()]

    def finished(stage: str, path: Path, value: Any) -> None:
        # Stage times are kept with the models: a resumed run reports the time
        # its cached stages took when they were built.
        now = time.perf_counter()
        log[stage] = value
        log.setdefault("seconds", {})[stage] = round(now - clock[0], 1)
        clock[0] = now
        (path / ".done").write_text(json.dumps(value))
        log_path.write_text(json.dumps(log, indent=2))

    if settings.model:
        from benchmarks import real_models

        base_path = real_models.ensure(settings.model)
        log["base"] = {"model": settings.model, "path": str(base_path)}
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        base = None
        autocast = torch.bfloat16
    else:
        base_path = root / "base"
        autocast = None
        if (base_path / ".done").exists():
            tokenizer = AutoTokenizer.from_pretrained(base_path)
            base = None
        else:
            tokenizer, base, losses = _train_toy_base(settings, data, base_path)
            finished("base_loss", base_path, [losses[0], losses[-1]])

    def load_base() -> Any:
        if base is not None:
            return copy.deepcopy(base)
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)

    for i, task in enumerate(tasks.EXPERT_TASKS):
        if (experts[task] / ".done").exists():
            LOG.info("quality: %s expert found in %s", task, experts[task])
            continue
        expert = load_base()
        freeze(expert, settings.frozen)
        losses = train_expert(expert, task, i, settings, data, tokenizer, autocast)
        LOG.info("quality: %s expert loss %.3f -> %.3f", task, losses[0], losses[-1])
        demo_models.save_checkpoint(
            expert, tokenizer, experts[task], dtype=torch.float32
        )
        del expert
        finished(f"{task}_loss", experts[task], [losses[0], losses[-1]])

    importance = root / "importance.safetensors"
    if not importance.exists():
        clock[0] = time.perf_counter()
        imap = calibrate_base(settings, base_path, tokenizer)
        imap.save(importance)
        log.setdefault("seconds", {})["calibration"] = round(
            time.perf_counter() - clock[0], 1
        )
        log_path.write_text(json.dumps(log, indent=2))
    return Models(root, base_path, experts, importance, tokenizer, log)


def freeze(model: Any, names: Sequence[str]) -> None:
    """Stop the named parameters of ``model`` from training; a name the model
    lacks is an error (a renamed parameter must not start training quietly)."""
    parameters = dict(model.named_parameters())
    unknown = [n for n in names if n not in parameters]
    if unknown:
        raise ValueError(
            f"Settings.frozen names {unknown}, which {type(model).__name__} lacks"
        )
    for name in names:
        parameters[name].requires_grad_(False)


def train_expert(
    model: Any,
    task: str,
    index: int,
    settings: Settings,
    data: TaskData,
    tokenizer: Any,
    autocast: torch.dtype | None,
) -> list[float]:
    """Fine-tune ``model`` (a whole model, or a PEFT model whose frozen
    parameters do not train) on ``task`` in place, the ``index``-th expert's
    seed; returns each step's loss. ``code``: language-model loss on
    ``builtin`` code; the item tasks: loss on the answer only."""
    from mergekit_aim.demo import models as demo_models

    if task == "code":
        return demo_models.train_causal_lm(
            model,
            tokenizer,
            data.code_train,
            steps=settings.code_steps,
            lr=settings.code_lr,
            seed=settings.seed + 1 + index,
            autocast=autocast,
            seq_len=settings.seq_len,
            batch_size=settings.batch_size,
            bos_token_id=block_bos(settings, tokenizer),
        )
    return train_completions(
        model,
        tokenizer,
        [(item.prompt, item.answer) for item in data.items[task].train],
        steps=settings.item_steps,
        lr=settings.item_lr,
        batch_size=settings.item_batch_size,
        seed=settings.seed + 1 + index,
        replay=data.base_train if settings.replay_batch_size else (),
        replay_batch_size=settings.replay_batch_size,
        replay_seq_len=settings.seq_len,
        autocast=autocast,
    )


def block_bos(settings: Settings, tokenizer: Any) -> int | None:
    """The token every packed block starts with, for the real models that
    expect one at the start of a sequence (Gemma-3); None otherwise."""
    if settings.model:
        from benchmarks.real_models import model_spec

        if model_spec(settings.model).bos_every_chunk:
            return tokenizer.bos_token_id
    return None


def calibrate_base(settings: Settings, base_path: Path, tokenizer: Any) -> Any:
    """The base's importance map, calibrated on ``builtin`` (task-agnostic)."""
    import mergekit_aim

    return mergekit_aim.calibrate(
        str(base_path),
        tokenizer=tokenizer,
        dataset="builtin",
        split=settings.calibration_split,
        num_samples=settings.calibration_samples,
        seq_len=512,
        seed=CALIBRATION_SEED,
        batch_size=8,
        # float32 whatever the checkpoint's dtype: Gemma-3's activations
        # overflow float16, and the statistic is summed over many tokens.
        dtype="float32",
        quiet=True,
    )


def _train_toy_base(settings: Settings, data: TaskData, path: Path) -> tuple:
    """A tokenizer, a small Llama trained from scratch and saved to ``path``,
    and its training losses."""
    from mergekit_aim.demo import models as demo_models

    tokenizer = demo_models.train_tokenizer(
        data.base_train, vocab_size=settings.vocab_size, split_digits=True
    )
    base = demo_models.tiny_llama(
        len(tokenizer),
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        seed=settings.seed,
    )
    losses = demo_models.train_causal_lm(
        base,
        tokenizer,
        data.base_train,
        steps=settings.base_steps,
        lr=settings.base_lr,
        seed=settings.seed,
        seq_len=settings.seq_len,
        batch_size=settings.batch_size,
    )
    LOG.info("quality: base loss %.3f -> %.3f", losses[0], losses[-1])
    demo_models.save_checkpoint(base, tokenizer, path)
    return tokenizer, base, losses


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
    random order and right-padded; optimizer and schedule as the demo's
    :func:`~mergekit_aim.demo.models.train_causal_lm`. ``prompt + completion``
    must tokenize with the prompt's tokens as a prefix. With ``replay`` texts,
    every step adds the language-model loss of ``replay_batch_size`` packed
    blocks of them (replay of pre-training data, which keeps the model from
    forgetting it). Returns each step's loss (the sum of both terms).
    ``autocast`` as in ``train_causal_lm``.
    """
    import torch

    from mergekit_aim.demo.models import run_training, shuffled_batches, token_blocks

    rows = []
    for prompt, completion in pairs:
        head = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
        if full[: len(head)] != head:
            raise ValueError(f"prompt {prompt!r} is not a token prefix of its example")
        rows.append((full, len(head)))
    if not rows:
        raise ValueError("no training pairs")
    draw = shuffled_batches(len(rows), batch_size, seed)

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
        return run_training(model, next_batch, steps=steps, lr=lr, autocast=autocast)
    replay_data = token_blocks(tokenizer, replay, replay_seq_len)
    if replay_data.shape[0] == 0:
        raise ValueError(f"the replay texts give fewer than {replay_seq_len} tokens")
    draw_replay = shuffled_batches(len(replay_data), replay_batch_size, seed + 1)

    def next_batches() -> list[dict[str, torch.Tensor]]:
        batch = replay_data[draw_replay()]
        return [next_batch(), {"input_ids": batch, "labels": batch}]

    return run_training(model, next_batches, steps=steps, lr=lr, autocast=autocast)
