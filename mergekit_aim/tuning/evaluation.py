"""Held-out loss: reading eval files and scoring a causal LM on them.

The measure ``mergekit-aim tune`` picks ω by and the demo and benchmarks report:
mean next-token negative log-likelihood over every predicted token of every
text (:func:`evaluate_loss`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mergekit_aim.calibration.data import read_text_file, read_txt_documents
from mergekit_aim.calibration.settings import CALIBRATION_DTYPES
from mergekit_aim.errors import AimConfigError

EVAL_SUFFIXES = (".txt", ".jsonl")
TEXT_FIELD = "text"
# Models are scored in the dtypes they can be calibrated in, by the same rule.
DTYPES = CALIBRATION_DTYPES
_EVAL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def parse_eval_spec(spec: str) -> tuple[str, Path]:
    """``NAME=FILE`` → ``(NAME, Path(FILE))``; the file is not read here."""
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise AimConfigError(
            f"--eval {spec!r}: expected NAME=FILE, e.g. --eval code=heldout.jsonl"
        )
    if not _EVAL_NAME.fullmatch(name):
        raise AimConfigError(
            f"--eval {spec!r}: the name {name!r} may use only letters, digits, "
            f"'_', '.' and '-'"
        )
    return name, Path(path).expanduser()


def read_eval_texts(path: str | os.PathLike) -> list[str]:
    """The documents of one eval file.

    ``.txt``: one document per paragraph, paragraphs separated by blank lines
    (the same rule as ``.txt`` calibration data; a file of single lines with
    no blank line between them is one document). ``.jsonl``: one JSON object
    per non-empty line, the document in its ``text`` field.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_file() and suffix not in EVAL_SUFFIXES:
        raise AimConfigError(
            f"eval file {str(path)!r}: expected a {' or '.join(EVAL_SUFFIXES)} file"
        )
    if suffix == ".txt" or not path.is_file():
        texts = read_txt_documents(path, "eval file")
    else:
        content = read_text_file(path, "eval file")
        texts = [_jsonl_text(path, n, line) for n, line in _lines(content)]
    texts = [text for text in texts if text]
    if not texts:
        raise AimConfigError(f"eval file {str(path)!r} holds no text")
    return texts


def _lines(content: str) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            yield number, line


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise AimConfigError(
            f"eval file {str(path)!r}, line {number}: not JSON ({error})"
        ) from None
    value = row.get(TEXT_FIELD) if isinstance(row, dict) else None
    if not isinstance(value, str):
        raise AimConfigError(
            f"eval file {str(path)!r}, line {number}: expected an object with a "
            f"string {TEXT_FIELD!r} field"
        )
    return value.strip()


def evaluate_loss(
    model_or_path: Any,
    texts: Sequence[str],
    *,
    tokenizer: Any = None,
    seq_len: int = 512,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: str = "auto",
) -> float:
    """Mean next-token negative log-likelihood (nats) of ``texts``.

    Each text is tokenized on its own with the tokenizer's default special
    tokens (a BOS where the tokenizer adds one; no EOS is appended) and cut
    into windows of at most ``seq_len`` tokens that overlap by one token, so
    every token after a text's first is predicted exactly once, with at most
    ``seq_len − 1`` tokens of context. The mean runs over all those tokens of
    all texts. Deterministic: eval mode, no gradient, a fixed batching order
    (windows sorted by length, padded on the right and masked).

    ``model_or_path``: a loaded causal LM (used on the device it is on; its
    train/eval mode is restored) or a checkpoint directory (loaded on
    ``device`` in ``dtype``: ``auto`` is float32 on CPU and the checkpoint's
    dtype elsewhere). ``tokenizer`` defaults to the checkpoint's own.
    """
    check_eval_settings(seq_len, batch_size)
    if isinstance(model_or_path, (str, os.PathLike)):
        path = str(model_or_path)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        model = load_model(path, device=device, dtype=dtype)
    else:
        model = model_or_path
        if tokenizer is None:
            tokenizer = load_tokenizer(getattr(model, "name_or_path", "") or "")
    windows = token_windows(tokenizer, texts, seq_len)
    total, count = sum_nll(model, windows, batch_size, pad_token_id(tokenizer))
    return total / count


def token_windows(
    tokenizer: Any, texts: Sequence[str], seq_len: int
) -> list[list[int]]:
    """The scoring windows of :func:`evaluate_loss` (token id lists)."""
    if isinstance(texts, str):
        raise AimConfigError("texts must be a sequence of strings, not one string")
    windows: list[list[int]] = []
    for text in texts:
        # Long documents are windowed below; the length warning does not apply.
        ids = list(tokenizer(text, verbose=False)["input_ids"])
        for start in range(0, max(len(ids) - 1, 0), seq_len - 1):
            windows.append(ids[start : start + seq_len])
    if not windows:
        raise AimConfigError(
            "the eval texts give no token to predict (every text is empty or a "
            "single token)"
        )
    return windows


def sum_nll(
    model: Any, windows: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> tuple[float, int]:
    """(summed next-token NLL, tokens predicted) over all ``windows``."""
    per_window = window_nll(model, windows, batch_size, pad_id)
    return sum(t for t, _ in per_window), sum(c for _, c in per_window)


@torch.no_grad()
def window_nll(
    model: Any, windows: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> list[tuple[float, int]]:
    """Per window, in input order: (summed next-token NLL, tokens predicted).

    Windows are batched longest first, padded on the right and masked; the
    model's train/eval mode is restored.
    """
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = [(0.0, 0)] * len(windows)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            chunk = [windows[i] for i in rows]
            ids = torch.full((len(chunk), len(chunk[0])), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, window in enumerate(chunk):
                ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
                mask[row, : len(window)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            logits = logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(targets.shape)
            totals = nll.sum(1).tolist()
            counts = (targets != -100).sum(1).tolist()
            for row, index in enumerate(rows):
                out[index] = (float(totals[row]), int(counts[row]))
    finally:
        model.train(was_training)
    return out


def pad_token_id(tokenizer: Any) -> int:
    # Padded positions are masked and never scored; any valid id will do.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def check_eval_settings(seq_len: int, batch_size: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise AimConfigError(
            f"seq_len (--seq-len) must be an integer >= 2; got {seq_len!r}"
        )
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise AimConfigError(
            f"batch_size (--batch-size) must be an integer >= 1; got {batch_size!r}"
        )


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # missing files, unknown classes, bad paths
        raise AimConfigError(
            f"could not load a tokenizer from {path!r} ({type(error).__name__}: "
            f"{error}); pass tokenizer="
        ) from None


def check_dtype(dtype: str) -> None:
    """Refuse an evaluation dtype that is not one of :data:`DTYPES`."""
    if dtype not in DTYPES:
        raise AimConfigError(f"dtype (--dtype) must be one of {DTYPES}; got {dtype!r}")


def load_model(path: str, *, device: str = "cpu", dtype: str = "auto") -> Any:
    """A causal LM from a checkpoint directory, in eval mode, for scoring."""
    from transformers import AutoModelForCausalLM

    from mergekit_aim.calibration.loading import resolve_dtype

    check_dtype(dtype)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, device_map={"": device}
        )
    except Exception as error:
        raise AimConfigError(
            f"could not load {path} as a causal LM on {device} "
            f"({type(error).__name__}: {error})"
        ) from error
    return model.eval()


# --------------------------------------------------------------------------
# Scores: what ``tune`` compares candidates by


@dataclass(frozen=True)
class Score:
    """One metric of one model: an ``--eval`` set's loss (named as the set) or
    an lm-evaluation-harness metric (named ``TASK/METRIC``).

    ``stderr`` is the standard error of ``value`` (``None`` where the source
    gives none); ``higher_is_better`` gives the metric's direction.
    """

    name: str
    value: float
    stderr: float | None
    higher_is_better: bool

    def gain(self, reference: Score) -> float:
        """How much better this is than ``reference``, in the metric's units
        (negative: worse), whatever the metric's direction."""
        sign = 1.0 if self.higher_is_better else -1.0
        return sign * (self.value - reference.value)

    def to_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "stderr": self.stderr,
            "higher_is_better": self.higher_is_better,
        }


class Scorer(Protocol):
    """Scores a loaded causal LM; ``metrics`` (name → higher is better) is
    known before any model is scored, so settings can be checked up front."""

    metrics: dict[str, bool]

    def score(self, model: Any) -> dict[str, Score]: ...


class LossSets:
    """The ``--eval`` sets: one :class:`Score` per set, its held-out loss
    (mean token NLL, as :func:`evaluate_loss`; lower is better).

    The standard error treats each window as a cluster of tokens: the loss is
    a ratio of sums over windows, and its error comes from how the windows'
    mean NLLs spread (weighted by their token counts).
    """

    def __init__(
        self,
        tokenizer: Any,
        evals: Mapping[str, Sequence[str]],
        *,
        seq_len: int = 512,
        batch_size: int = 4,
    ):
        check_eval_settings(seq_len, batch_size)
        self.windows = {
            name: token_windows(tokenizer, texts, seq_len)
            for name, texts in evals.items()
        }
        self.tokens = {
            name: sum(len(w) - 1 for w in ws) for name, ws in self.windows.items()
        }
        self.batch_size = batch_size
        self.pad_id = pad_token_id(tokenizer)
        self.metrics = {name: False for name in self.windows}

    def score(self, model: Any) -> dict[str, Score]:
        scores = {}
        for name, windows in self.windows.items():
            per_window = window_nll(model, windows, self.batch_size, self.pad_id)
            value, stderr = clustered_mean(per_window)
            scores[name] = Score(name, value, stderr, higher_is_better=False)
        return scores


def clustered_mean(sums_counts: Sequence[tuple[float, int]]) -> tuple[float, float]:
    """(Σ sums / Σ counts, its standard error over the clusters).

    The ratio estimator's linearised variance, ``n/(n−1) · Σ (s_i − m·c_i)² /
    (Σ c_i)²``; 0 for a single cluster (no spread to measure).
    """
    total = sum(s for s, _ in sums_counts)
    count = sum(c for _, c in sums_counts)
    mean = total / count
    n = len(sums_counts)
    if n < 2:
        return mean, 0.0
    spread = sum((s - mean * c) ** 2 for s, c in sums_counts)
    return mean, math.sqrt(n / (n - 1) * spread) / count
