"""Calibration data: where the text comes from, which texts are kept, and how
they become token blocks.

The stages run top to bottom in this module:

1. **Source** (:func:`load_rows`). The user's ``dataset`` string names
   ``pile-val`` (the paper's default, ``mit-han-lab/pile-val-backup``, split
   ``validation``), ``builtin`` (see :mod:`mergekit_aim.calibration.builtin`),
   a local ``.txt`` (documents separated by blank lines), ``.jsonl`` or
   ``.parquet`` file, or any other Hugging Face dataset id. Every source
   becomes a :class:`datasets.Dataset` whose rows hold either text (a string
   column, ``text`` unless told otherwise) or chat messages (a ``messages``
   column of ``{role, content}`` lists, rendered with the tokenizer's chat
   template).
2. **Sampling** (:func:`sample_token_ids`), as the paper's code does it:
   shuffle the rows with ``seed``, walk them in that order, tokenize each
   stripped text with the model's tokenizer (default special tokens, like
   ``tokenizer.encode``), skip empty encodings and those longer than
   ``seq_len``, keep the first ``num_samples``.
3. **Packing** (:func:`pack_blocks`): concatenate the kept token ids into one
   stream and cut it into ``seq_len`` blocks, dropping the remainder, so no
   block is padded. With ``bos_per_block`` on, every block is the BOS token
   followed by the next ``seq_len - 1`` tokens of the stream (a text's own
   BOS that would come right after it is dropped instead of doubled), so
   every block starts the way the model saw every sequence start in
   training. The paper's code never adds one: its blocks begin mid-text
   without a BOS, which models trained always to see one at position 0
   (Gemma-3) read as garbled input. ``auto`` (the default) turns it on
   exactly when the tokenizer prepends a BOS to every text it encodes (see
   :func:`resolve_bos_per_block`); ``false`` is the paper's packing.

Nothing falls back silently: an unreadable source, a missing column or data
that yields no full block raises :class:`CalibrationDataError` naming the
dataset and what to do instead.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_aim.calibration.settings import (
    BOS_PER_BLOCK_CHOICES,  # noqa: F401 (re-exported: the CLI's choices)
    DEFAULT_BOS_PER_BLOCK,
    PILE_VAL,
    BosPerBlock,
    CalibrationConfig,
    bos_per_block_value,
)
from mergekit_aim.errors import AimConfigError, CalibrationDataError, TextFileError

if TYPE_CHECKING:
    import datasets
    import torch

LOG = logging.getLogger(__name__)

PILE_VAL_ID = "mit-han-lab/pile-val-backup"
PILE_VAL_SPLIT = "validation"
BUILTIN = "builtin"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_TEXT_COLUMN = "text"
CHAT_COLUMN = "messages"

# Suffixes that mark a string as a file path rather than a hub id, so that a
# mistyped or unsupported file is reported as such instead of being looked up
# on the Hub.
_FILE_LIKE_SUFFIXES = frozenset(
    {*LOCAL_SUFFIXES, ".json", ".csv", ".tsv", ".arrow", ".md", ".text"}
    | {".gz", ".bz2", ".xz", ".zst", ".zip", ".tar"}
)
_OFFLINE_HINT = (
    "use `--dataset builtin` (a corpus mergekit-aim builds offline from this "
    "machine's Python sources) or a local .txt/.jsonl/.parquet file"
)


@dataclass(frozen=True)
class CalibrationBlocks:
    """Token blocks to run the base model on, with their provenance.

    ``tokens`` is a LongTensor ``[num_blocks, seq_len]``; ``fingerprint`` is
    the sha256 hex digest of the dataset identity and the exact token ids,
    so equal fingerprints mean identical calibration input; ``num_texts`` is
    the number of texts kept; ``dataset`` is the string the user gave;
    ``description`` is JSON-serialisable provenance (resolved source, split,
    text column, settings, counts, source fingerprint where known).
    """

    tokens: torch.Tensor
    fingerprint: str
    num_texts: int
    dataset: str
    description: dict[str, object]


@dataclass(frozen=True)
class _Source:
    """A resolved ``dataset`` string."""

    kind: str  # "hub" | "builtin" | "local"
    location: str  # hub id, "builtin", or an absolute file path
    split: str | None  # None for local files (they have a single split)


def build_blocks(
    dataset: str,
    tokenizer: Any,
    *,
    num_samples: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
    split: str | None = None,
    text_column: str | None = None,
    trust_remote_code: bool = False,
    bos_per_block: BosPerBlock | str = DEFAULT_BOS_PER_BLOCK,
) -> CalibrationBlocks:
    """Sample and pack calibration blocks from ``dataset`` the paper's way.

    See the module docstring for sources and the procedure; ``bos_per_block``
    (``"auto"``, True or False, or those words as strings) chooses whether
    every block starts with the tokenizer's BOS. Fewer than ``num_samples``
    usable texts logs a warning and continues; no full block raises
    CalibrationDataError, as do unreadable data and invalid settings (an
    invalid ``bos_per_block`` raises AimConfigError). ``num_samples``,
    ``seq_len`` and ``seed`` left at None take CalibrationConfig's defaults.
    """
    defaults = CalibrationConfig.model_fields
    if num_samples is None:
        num_samples = defaults["num_samples"].default
    if seq_len is None:
        seq_len = defaults["seq_len"].default
    if seed is None:
        seed = defaults["seed"].default
    _check_positive("num_samples", num_samples)
    _check_positive("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise CalibrationDataError(f"seed must be an integer; got {seed!r}")
    num_samples, seq_len, seed = int(num_samples), int(seq_len), int(seed)
    bos_setting = bos_per_block_value(bos_per_block)
    bos_id = resolve_bos_per_block(bos_setting, tokenizer)
    if bos_id is not None and seq_len < 2:
        raise CalibrationDataError(
            f"seq_len must be at least 2 when every block starts with BOS "
            f"(bos_per_block={setting_text(bos_setting)}): a block is the BOS "
            f"plus seq_len - 1 tokens of text; got seq_len={seq_len}"
        )
    source = _resolve_source(dataset, split)
    rows = _read_rows(source, dataset, trust_remote_code)
    column, chat = _text_column(rows, text_column, dataset)
    texts = sample_token_ids(
        rows,
        column,
        tokenizer,
        num_samples=num_samples,
        seq_len=seq_len,
        seed=seed,
        chat=chat,
    )
    if len(texts) < num_samples:
        LOG.warning(
            "calibration data %s: only %d of %d rows gave a usable text "
            "(1 to %d tokens); num_samples asked for %d, continuing with %d",
            dataset,
            len(texts),
            len(rows),
            seq_len,
            num_samples,
            len(texts),
        )
    if not texts:
        raise CalibrationDataError(
            f"calibration data {dataset!r}: none of its {len(rows)} rows gave a "
            f"usable text of 1 to seq_len={seq_len} tokens (longer texts are "
            f"skipped, as in the paper); raise seq_len"
            + (
                ""
                if dataset == BUILTIN
                else " or use data with shorter texts (for example `--dataset builtin`)"
            )
        )
    tokens = pack_blocks(texts, seq_len, bos_token_id=bos_id)
    if tokens.shape[0] == 0:
        gathered = sum(len(ids) for ids in texts)
        raise CalibrationDataError(
            f"calibration data {dataset!r} gave no full block of seq_len="
            f"{seq_len} tokens: {len(texts)} texts kept (of num_samples="
            f"{num_samples}) hold {gathered} tokens in all. Raise num_samples, "
            f"lower seq_len, or use a larger dataset (for example "
            f"`--dataset builtin` or pile-val)"
        )
    source_fingerprint = _source_fingerprint(source)
    identity = {
        "kind": source.kind,
        # A local file is identified by its contents, not where it lies.
        "name": source.location if source.kind != "local" else None,
        "split": source.split,
        "text_column": column,
        "source_fingerprint": source_fingerprint,
    }
    description: dict[str, object] = {
        "dataset": dataset,
        "source": source.kind,
        "resolved": source.location,
        "split": source.split,
        "text_column": column,
        "chat": chat,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "seed": seed,
        "num_texts": len(texts),
        "num_blocks": int(tokens.shape[0]),
        "num_tokens": int(tokens.numel()),
        "source_fingerprint": source_fingerprint,
        "bos_per_block": bos_setting,
        "bos_per_block_resolved": bos_id is not None,
        "bos_token_id": bos_id,
    }
    return CalibrationBlocks(
        tokens=tokens,
        fingerprint=_blocks_fingerprint(identity, tokens),
        num_texts=len(texts),
        dataset=dataset,
        description=description,
    )


def tokenizer_prepends_bos(tokenizer: Any) -> bool:
    """Whether encoding a text with the default special tokens starts with BOS.

    That is the tokenizer telling how the model saw every sequence start in
    training (Gemma, Llama); a BOS token that is merely declared but never
    added (SmolLM2's ``<|im_start|>``) says nothing of the kind.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("x")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def resolve_bos_per_block(setting: BosPerBlock | str, tokenizer: Any) -> int | None:
    """The token id every block starts with, or None for the paper's packing.

    ``"auto"`` is on exactly when :func:`tokenizer_prepends_bos`; True needs
    a tokenizer with a BOS token and raises AimConfigError otherwise.
    """
    setting = bos_per_block_value(setting)
    if setting == "auto":
        return tokenizer.bos_token_id if tokenizer_prepends_bos(tokenizer) else None
    if not setting:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise AimConfigError(
            f"bos_per_block is true but the tokenizer {name!r} has no BOS token to "
            f"start each block with; use bos_per_block auto or false"
        )
    return int(bos)


def setting_text(setting: BosPerBlock) -> str:
    """``setting`` as a user writes it: auto, true or false."""
    return setting if isinstance(setting, str) else str(setting).lower()


def _check_positive(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise CalibrationDataError(f"{field} must be an integer >= 1; got {value!r}")


# --------------------------------------------------------------------------
# 1. sources


def load_rows(
    dataset: str,
    *,
    split: str | None = None,
    text_column: str | None = None,
    trust_remote_code: bool = False,
) -> datasets.Dataset:
    """The rows of ``dataset`` in source order (not shuffled).

    Checks that the rows hold text in ``text_column`` (default ``text``, or
    chat messages in ``messages`` when there is no ``text`` column) and
    raises CalibrationDataError naming the columns present otherwise.
    """
    source = _resolve_source(dataset, split)
    rows = _read_rows(source, dataset, trust_remote_code)
    _text_column(rows, text_column, dataset)
    return rows


def _resolve_source(dataset: str, split: str | None) -> _Source:
    if not isinstance(dataset, str) or not dataset.strip():
        raise CalibrationDataError(
            f"dataset must name pile-val, builtin, a local "
            f"{'/'.join(LOCAL_SUFFIXES)} file or a Hugging Face dataset id; "
            f"got {dataset!r}"
        )
    if dataset == PILE_VAL:
        return _Source("hub", PILE_VAL_ID, split or PILE_VAL_SPLIT)
    if dataset == BUILTIN:
        return _Source("builtin", BUILTIN, split or "all")
    path = Path(dataset).expanduser()
    if _looks_like_path(dataset) or path.exists():
        return _local_source(dataset, path, split)
    return _Source("hub", dataset, split or "train")


def _looks_like_path(dataset: str) -> bool:
    if dataset.startswith(("/", "~", "./", "../", ".\\", "..\\")) or "\\" in dataset:
        return True
    name = Path(dataset).name.lower()
    return any(name.endswith(suffix) for suffix in _FILE_LIKE_SUFFIXES)


def _local_source(dataset: str, path: Path, split: str | None) -> _Source:
    supported = ", ".join(LOCAL_SUFFIXES)
    if not path.exists():
        raise CalibrationDataError(
            f"calibration data file {dataset!r} does not exist (resolved to "
            f"{path.resolve()}); give an existing {supported} file, builtin, "
            f"pile-val or a Hugging Face dataset id"
        )
    if not path.is_file() or path.suffix.lower() not in LOCAL_SUFFIXES:
        if path.is_dir():
            what = "a directory"
        else:
            what = f"a {path.suffix} file" if path.suffix else "a file without suffix"
        raise CalibrationDataError(
            f"calibration data {dataset!r} is {what}; local calibration data "
            f"must be a file ending in one of: {supported}"
        )
    if split not in (None, "train"):
        raise CalibrationDataError(
            f"split {split!r} does not apply to the local file {dataset!r}: "
            f"a local file is a single split; leave split unset"
        )
    return _Source("local", str(path.resolve()), None)


def _read_rows(
    source: _Source, dataset: str, trust_remote_code: bool
) -> datasets.Dataset:
    if source.kind == "builtin":
        rows = _builtin_rows(source.split or "all")
    elif source.kind == "local":
        rows = _local_rows(Path(source.location), dataset)
    else:
        rows = _hub_rows(source, trust_remote_code)
    if len(rows) == 0:
        raise CalibrationDataError(
            f"calibration data {dataset!r} (split {source.split!r}) has no rows"
        )
    return rows


def _builtin_rows(split: str) -> datasets.Dataset:
    import datasets

    from mergekit_aim.calibration.builtin import builtin_documents

    documents = builtin_documents(split=split)
    return datasets.Dataset.from_dict(
        {
            "text": [document.text for document in documents],
            "domain": [document.domain for document in documents],
        }
    )


def _local_rows(path: Path, dataset: str) -> datasets.Dataset:
    import datasets

    suffix = path.suffix.lower()
    if suffix == ".txt":
        return datasets.Dataset.from_dict(
            {"text": read_txt_documents(path, "calibration file")}
        )
    builder = "json" if suffix == ".jsonl" else "parquet"
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:
        expected = (
            "one JSON object per line with the same fields"
            if builder == "json"
            else "a readable Parquet table"
        )
        raise CalibrationDataError(
            f"could not read the calibration file {dataset!r} (expected "
            f"{expected}): {type(error).__name__}: {error}"
        ) from error


def read_text_file(path: str | os.PathLike, role: str) -> str:
    """A UTF-8 text file's content; ``role`` ("calibration file", "eval file")
    names the file in errors. The one reader of user text files."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise TextFileError(f"{role} {str(path)!r} {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TextFileError(
            f"{role} {str(path)!r} is not UTF-8 text ({error})"
        ) from None


def read_txt_documents(path: str | os.PathLike, role: str) -> list[str]:
    """The documents of a ``.txt`` file: its paragraphs (see :func:`paragraphs`),
    for calibration data and eval sets alike."""
    return paragraphs(read_text_file(path, role))


def paragraphs(text: str) -> list[str]:
    """The non-empty blocks of ``text`` separated by blank lines, stripped.

    The one rule for ``.txt`` files, calibration data and eval files alike.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = (part.strip() for part in re.split(r"\n[ \t]*\n", text))
    return [block for block in blocks if block]


def _hub_rows(source: _Source, trust_remote_code: bool) -> datasets.Dataset:
    import datasets

    kwargs: dict[str, Any] = {"split": source.split}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        rows = datasets.load_dataset(source.location, **kwargs)
    except Exception as error:
        # Offline mode, a missing dataset or split and network failures all
        # surface here with differing types; the user's remedy is the same.
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        raise CalibrationDataError(
            f"could not load the calibration dataset {source.location!r} (split "
            f"{source.split!r}) from the Hugging Face Hub"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: "
            f"{type(error).__name__}: {error}. If it is unreachable or the id "
            f"or split is wrong, {_OFFLINE_HINT}"
        ) from error
    if not isinstance(rows, datasets.Dataset):
        raise CalibrationDataError(
            f"the calibration dataset {source.location!r} (split "
            f"{source.split!r}) loaded as {type(rows).__name__}, not a table "
            f"of rows; name a single split with --split"
        )
    return rows


def _text_column(
    rows: datasets.Dataset, requested: str | None, dataset: str
) -> tuple[str, bool]:
    """The column holding each row's text and whether it holds chat messages
    (lists of ``{role, content}``) rather than strings."""
    import datasets

    columns = list(rows.column_names)
    if requested is not None:
        column = requested
    elif DEFAULT_TEXT_COLUMN in columns:
        column = DEFAULT_TEXT_COLUMN
    elif CHAT_COLUMN in columns:
        column = CHAT_COLUMN
    else:
        column = DEFAULT_TEXT_COLUMN
    if column not in columns:
        raise CalibrationDataError(
            f"calibration data {dataset!r} has no column {column!r}; its "
            f"columns are {columns}. Name the text column with text_column "
            f"(--text-column), or provide a {CHAT_COLUMN!r} column of chat "
            f"messages"
        )
    feature = rows.features[column]
    if isinstance(feature, datasets.Value):
        if feature.dtype in ("string", "large_string"):
            return column, False
        raise CalibrationDataError(
            f"column {column!r} of calibration data {dataset!r} holds "
            f"{feature.dtype} values; expected text (strings) or chat "
            f"messages (lists of {{role, content}})"
        )
    return column, True


# --------------------------------------------------------------------------
# 2. sampling


def sample_token_ids(
    rows: datasets.Dataset,
    column: str,
    tokenizer: Any,
    *,
    num_samples: int,
    seq_len: int,
    seed: int,
    chat: bool = False,
) -> list[list[int]]:
    """Token ids of the first ``num_samples`` usable texts in the order of
    ``rows.shuffle(seed=seed)``; usable means 1 to ``seq_len`` tokens.

    Text rows are stripped and tokenized with the tokenizer's default special
    tokens; chat rows are rendered with its chat template (which places the
    special tokens itself) and tokenized without adding more.
    """
    if chat and getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise CalibrationDataError(
            f"calibration column {column!r} holds chat messages but the "
            f"tokenizer {name!r} has no chat template to render them; use a "
            f"tokenizer with a chat template or a column of plain text"
        )
    # The permutation depends only on the seed and the row count, so
    # shuffling just the text column gives the order of rows.shuffle(seed).
    shuffled = rows.select_columns([column]).shuffle(seed=seed, keep_in_memory=True)
    kept: list[list[int]] = []
    for row in shuffled:
        ids = _encode(row[column], tokenizer, chat, column)
        if 0 < len(ids) <= seq_len:
            kept.append(ids)
            if len(kept) == num_samples:
                break
    return kept


def _encode(value: Any, tokenizer: Any, chat: bool, column: str) -> list[int]:
    if value is None:
        return []
    if not chat:
        return list(tokenizer(value.strip())["input_ids"])
    messages = _chat_messages(value, column)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_messages(value: Any, column: str) -> list[dict[str, Any]]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if all(
            isinstance(message, Mapping) and "role" in message and "content" in message
            for message in value
        ):
            return [dict(message) for message in value]
    raise CalibrationDataError(
        f"a row's {column!r} value is not a list of chat messages with 'role' "
        f"and 'content': {str(value)[:200]!r}"
    )


# --------------------------------------------------------------------------
# 3. packing


def pack_blocks(
    texts: Sequence[Sequence[int]], seq_len: int, *, bos_token_id: int | None = None
) -> torch.Tensor:
    """Concatenate token ids and cut them into ``[num_blocks, seq_len]``
    (LongTensor), dropping the tail shorter than ``seq_len``; zero blocks
    gives a ``[0, seq_len]`` tensor.

    With ``bos_token_id`` every block is that token followed by the next
    ``seq_len - 1`` tokens of the stream. BOS tokens the stream holds at a
    block's start (a text's own, where a text begins there) are skipped, so
    no block starts with two; those inside a block stay where they are.
    """
    import torch

    stream = list(itertools.chain.from_iterable(texts))
    if bos_token_id is None:
        num_blocks = len(stream) // seq_len
        tokens = torch.tensor(stream[: num_blocks * seq_len], dtype=torch.long)
        return tokens.reshape(num_blocks, seq_len)
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 with a BOS; got {seq_len}")
    body = seq_len - 1
    blocks: list[list[int]] = []
    start = 0
    while True:
        while start < len(stream) and stream[start] == bos_token_id:
            start += 1
        if start + body > len(stream):
            break
        blocks.append([bos_token_id, *stream[start : start + body]])
        start += body
    return torch.tensor(blocks, dtype=torch.long).reshape(len(blocks), seq_len)


# --------------------------------------------------------------------------
# provenance


def _source_fingerprint(source: _Source) -> str | None:
    """A content fingerprint of the source where one is cheap to know."""
    if source.kind == "builtin":
        from mergekit_aim.calibration.builtin import builtin_fingerprint

        return f"builtin:{builtin_fingerprint()}"
    if source.kind == "local":
        digest = hashlib.sha256()
        with open(source.location, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    return None


def _blocks_fingerprint(identity: dict[str, object], tokens: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(identity, sort_keys=True).encode())
    digest.update(f"\0{tuple(tokens.shape)}\0".encode())
    digest.update(tokens.contiguous().numpy().astype("<i8").tobytes())
    return digest.hexdigest()
