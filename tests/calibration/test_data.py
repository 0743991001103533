"""Calibration data: sources, the paper's sampling and packing, and refusals.

The tokenizers are built here: a word-level one with known ids (``tN`` is id
``10 + N``; ``<s>`` = 2 and ``</s>`` = 3 wrap every encoding unless built
without special tokens) for hand-computed blocks, and a small byte-level BPE
for real text.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from mergekit_aim.calibration import data
from mergekit_aim.calibration.builtin import builtin_documents, builtin_fingerprint
from mergekit_aim.calibration.data import (
    CalibrationBlocks,
    build_blocks,
    load_rows,
    pack_blocks,
)
from mergekit_aim.errors import AimConfigError, CalibrationDataError

BOS, EOS = 2, 3
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
)


def word_tokenizer(*, specials: bool = True, chat: bool = False) -> Any:
    """Whitespace word-level tokenizer: ``tN`` -> ``10 + N`` (N < 100)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": BOS, "</s>": EOS}
    vocab.update({f"t{n}": 10 + n for n in range(100)})
    vocab.update({"user": 200, "assistant": 201, "system": 202})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if specials:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", BOS), ("</s>", EOS)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        pad_token="[PAD]",
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@functools.lru_cache(maxsize=1)
def bpe_tokenizer() -> Any:
    """A byte-level BPE (vocabulary 384) trained on a slice of the builtin
    corpus, with a BOS token prepended to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=384,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [document.text for document in builtin_documents()[::100]]
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def words(*numbers: int) -> str:
    return " ".join(f"t{n}" for n in numbers)


def write_txt(path: Path, documents: list[str]) -> Path:
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------
# packing and sampling


def test_pack_blocks_drops_the_remainder() -> None:
    blocks = pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert pack_blocks([[1, 2]], 4).shape == (0, 4)


def test_hand_computed_blocks(tmp_path: Path) -> None:
    # datasets' shuffle(seed=42) of 5 rows visits rows 4, 2, 3, 1, 0.
    order = datasets.Dataset.from_dict({"i": list(range(5))}).shuffle(seed=42)["i"]
    assert list(order) == [4, 2, 3, 1, 0]
    path = write_txt(
        tmp_path / "five.txt",
        [
            words(1, 2, 3),  # row 0: 5 tokens > seq_len, skipped (never reached)
            words(4),  # row 1: <s> t4 </s>
            words(5, 6),  # row 2: 4 tokens = seq_len, kept
            words(7, 8, 9, 10),  # row 3: 6 tokens, skipped
            words(11),  # row 4: <s> t11 </s>
        ],
    )
    # The paper's packing; the tokenizer prepends <s>, so auto would not be it.
    blocks = build_blocks(
        str(path), word_tokenizer(), num_samples=3, seq_len=4, bos_per_block=False
    )
    # Kept in order: rows 4, 2, 1 -> 2 21 3 | 2 15 16 3 | 2 14 3 (10 tokens).
    assert blocks.tokens.tolist() == [[2, 21, 3, 2], [15, 16, 3, 2]]
    assert blocks.num_texts == 3
    assert blocks.dataset == str(path)
    assert blocks.description["num_blocks"] == 2
    assert blocks.description["num_texts"] == 3
    assert blocks.description["bos_per_block"] is False
    assert blocks.description["bos_per_block_resolved"] is False
    # Every block starts with <s>: the text-initial <s> at a block's start is
    # the block's own, the one inside block 0 stays, the tail (14 3) is dropped.
    with_bos = build_blocks(str(path), word_tokenizer(), num_samples=3, seq_len=4)
    assert with_bos.tokens.tolist() == [[2, 21, 3, 2], [2, 15, 16, 3]]
    assert with_bos.description["bos_per_block"] == "auto"
    assert with_bos.description["bos_per_block_resolved"] is True
    assert with_bos.description["bos_token_id"] == BOS
    assert with_bos.fingerprint != blocks.fingerprint


def test_shuffle_follows_datasets_with_the_seed(tmp_path: Path) -> None:
    texts = [words(n) for n in range(30)]
    path = write_txt(tmp_path / "thirty.txt", texts)
    tokenizer = word_tokenizer(specials=False)
    orders = []
    for seed in (0, 7, 42):
        blocks = build_blocks(
            str(path), tokenizer, num_samples=30, seq_len=1, seed=seed
        )
        expected = datasets.Dataset.from_dict({"text": texts}).shuffle(seed=seed)
        assert blocks.tokens.flatten().tolist() == [
            10 + int(text[1:]) for text in expected["text"]
        ]
        orders.append(blocks.tokens.flatten().tolist())
    assert orders[0] != orders[1] != orders[2]
    default = build_blocks(str(path), tokenizer, num_samples=30, seq_len=1)
    assert default.tokens.flatten().tolist() == orders[2]  # seed 42 by default


def test_num_samples_caps_the_texts(tmp_path: Path) -> None:
    path = write_txt(tmp_path / "many.txt", [words(n, n + 1) for n in range(40)])
    blocks = build_blocks(str(path), word_tokenizer(), num_samples=5, seq_len=4)
    assert blocks.num_texts == 5
    assert blocks.tokens.shape == (5, 4)  # each text is exactly 4 tokens


def test_empty_encodings_are_skipped(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "blank.jsonl",
        [{"text": ""}, {"text": "   \n "}, {"text": words(1, 2)}, {"text": None}],
    )
    blocks = build_blocks(
        str(path), word_tokenizer(specials=False), num_samples=8, seq_len=2
    )
    assert blocks.num_texts == 1
    assert blocks.tokens.tolist() == [[11, 12]]


def test_too_few_texts_warns_and_continues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_txt(tmp_path / "few.txt", [words(1), words(2, 3, 4, 5, 6), words(7)])
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        blocks = build_blocks(str(path), word_tokenizer(), num_samples=10, seq_len=3)
    assert blocks.num_texts == 2
    assert (
        "only 2 of 3 rows" in caplog.text and "num_samples asked for 10" in caplog.text
    )


def test_no_full_block_is_an_error(tmp_path: Path) -> None:
    path = write_txt(tmp_path / "short.txt", [words(1), words(2)])
    with pytest.raises(CalibrationDataError) as error:
        build_blocks(str(path), word_tokenizer(), num_samples=4, seq_len=16)
    message = str(error.value)
    assert "no full block" in message and "seq_len=16" in message
    assert "2 texts kept" in message and "6 tokens" in message
    assert "num_samples" in message and "builtin" in message


def test_only_too_long_texts_is_an_error(tmp_path: Path) -> None:
    path = write_txt(tmp_path / "long.txt", [words(1, 2, 3), words(4, 5, 6)])
    with pytest.raises(
        CalibrationDataError, match=r"none of its 2 rows.*seq_len=3"
    ) as e:
        build_blocks(str(path), word_tokenizer(), seq_len=3)
    assert "--dataset builtin" in str(e.value)


def test_builtin_too_short_blocks_suggest_seq_len_only() -> None:
    with pytest.raises(CalibrationDataError, match="raise seq_len") as error:
        build_blocks("builtin", bpe_tokenizer(), num_samples=4, seq_len=2)
    assert "--dataset builtin" not in str(error.value)


@pytest.mark.parametrize(
    ("field", "settings"),
    [
        ("num_samples", {"num_samples": 0}),
        ("seq_len", {"seq_len": 0}),
        ("seq_len", {"seq_len": True}),
        ("num_samples", {"num_samples": 2.5}),
    ],
)
def test_invalid_settings_name_the_field(
    tmp_path: Path, field: str, settings: dict[str, Any]
) -> None:
    path = write_txt(tmp_path / "x.txt", [words(1, 2)])
    with pytest.raises(CalibrationDataError, match=f"^{field} must be an integer"):
        build_blocks(str(path), word_tokenizer(), **settings)


# --------------------------------------------------------------------------
# a BOS at the start of every block


@pytest.mark.parametrize(
    ("texts", "seq_len", "expected"),
    [
        # No BOS in the stream: each block is BOS + seq_len - 1 stream tokens,
        # and the tail (20) is dropped.
        (
            [[11, 12, 13], [14, 15], [16, 17, 18, 19, 20]],
            4,
            [[2, 11, 12, 13], [2, 14, 15, 16], [2, 17, 18, 19]],
        ),
        # Text-initial BOS at a block's start is the block's BOS, not doubled;
        # one inside a block stays where it is.
        (
            [[2, 11, 12], [2, 13], [2, 14, 15, 16]],
            3,
            [[2, 11, 12], [2, 13, 2], [2, 14, 15]],
        ),
        # A run of BOS tokens at a block's start collapses into one.
        ([[2], [2], [2, 11, 12], [13]], 3, [[2, 11, 12]]),
        ([[11]], 2, [[2, 11]]),
        ([[2, 11]], 3, []),
    ],
)
def test_pack_blocks_with_bos_hand_computed(
    texts: list[list[int]], seq_len: int, expected: list[list[int]]
) -> None:
    blocks = pack_blocks(texts, seq_len, bos_token_id=BOS)
    assert blocks.dtype == torch.long
    assert blocks.shape == (len(expected), seq_len)
    assert blocks.tolist() == expected


@pytest.mark.parametrize("seed", range(5))
def test_pack_blocks_with_bos_keeps_the_stream(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(40):
        length = int(torch.randint(1, 12, (1,), generator=generator))
        body = torch.randint(10, 30, (length,), generator=generator).tolist()
        texts.append([BOS, *body] if seed % 2 == 0 else body)
    seq_len = 7
    stream = [token for text in texts for token in text]
    blocks = pack_blocks(texts, seq_len, bos_token_id=BOS)
    assert blocks.shape[0] > 0
    # Exactly one BOS at the start of every block, never two.
    assert (blocks[:, 0] == BOS).all() and (blocks[:, 1] != BOS).all()
    # The rest of every block is the stream in order: what is left out is only
    # BOS tokens (replaced by the blocks' own) and a tail too short for a block.
    body = [token for token in blocks[:, 1:].flatten().tolist() if token != BOS]
    content = [token for token in stream if token != BOS]
    assert body == content[: len(body)]
    assert 0 <= len(content) - len(body) < seq_len - 1
    # Off, the packing is the paper's: the stream cut into seq_len blocks.
    paper = pack_blocks(texts, seq_len)
    assert paper.flatten().tolist() == stream[: paper.numel()]
    assert len(stream) - paper.numel() < seq_len


def test_auto_follows_whether_the_tokenizer_prepends_bos(tmp_path: Path) -> None:
    path = write_txt(tmp_path / "t.txt", [words(n, n + 1, n + 2) for n in range(20)])
    settings: dict[str, Any] = {"num_samples": 20, "seq_len": 5}
    prepends = word_tokenizer()
    on = build_blocks(str(path), prepends, **settings)
    assert (on.tokens[:, 0] == BOS).all() and (on.tokens[:, 1] != BOS).all()
    assert torch.equal(
        on.tokens,
        build_blocks(str(path), prepends, bos_per_block=True, **settings).tokens,
    )
    # A tokenizer that declares <s> but adds none to a text (like SmolLM2's)
    # gets the paper's packing under auto, and the same blocks as false.
    declared = word_tokenizer(specials=False)
    assert declared.bos_token_id == BOS
    off = build_blocks(str(path), declared, **settings)
    assert off.description["bos_per_block_resolved"] is False
    assert off.description["bos_token_id"] is None
    assert torch.equal(
        off.tokens,
        build_blocks(str(path), declared, bos_per_block="false", **settings).tokens,
    )
    assert BOS not in off.tokens.flatten().tolist()
    # true puts the declared BOS at every block's start all the same.
    forced = build_blocks(str(path), declared, bos_per_block="TRUE", **settings)
    assert forced.description["bos_per_block"] is True
    assert (forced.tokens[:, 0] == BOS).all()
    assert forced.fingerprint != off.fingerprint


def test_bos_per_block_true_needs_a_bos_token(tmp_path: Path) -> None:
    path = write_txt(tmp_path / "t.txt", [words(1, 2, 3)])
    tokenizer = word_tokenizer(specials=False)
    tokenizer.bos_token = None
    assert tokenizer.bos_token_id is None
    assert build_blocks(str(path), tokenizer, seq_len=3).tokens.tolist() == [
        [11, 12, 13]
    ]
    with pytest.raises(AimConfigError, match="bos_per_block is true.*no BOS token"):
        build_blocks(str(path), tokenizer, seq_len=3, bos_per_block=True)


def test_bos_per_block_needs_room_for_text(tmp_path: Path) -> None:
    path = write_txt(tmp_path / "t.txt", [words(1)])
    with pytest.raises(CalibrationDataError) as error:
        build_blocks(str(path), word_tokenizer(), seq_len=1)
    message = str(error.value)
    assert "seq_len must be at least 2" in message
    assert "bos_per_block=auto" in message and "got seq_len=1" in message


@pytest.mark.parametrize("value", ["sometimes", "yes", "", 1, 0, None, 0.5])
def test_bad_bos_per_block_names_the_field(tmp_path: Path, value: Any) -> None:
    path = write_txt(tmp_path / "t.txt", [words(1, 2, 3)])
    with pytest.raises(AimConfigError) as error:
        build_blocks(str(path), word_tokenizer(), seq_len=3, bos_per_block=value)
    message = str(error.value)
    assert message.startswith("bos_per_block must be auto, true or false")
    assert repr(value) in message


# --------------------------------------------------------------------------
# sources


def test_txt_jsonl_and_parquet_give_the_same_blocks(tmp_path: Path) -> None:
    texts = [words(*range(n, n + 1 + n % 4)) for n in range(30)]
    txt = write_txt(tmp_path / "d.txt", texts)
    jsonl = write_jsonl(
        tmp_path / "d.jsonl", [{"id": i, "body": t} for i, t in enumerate(texts)]
    )
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"body": texts, "n": list(range(30))}).to_parquet(
        str(parquet)
    )
    tokenizer = word_tokenizer()
    built = {
        "txt": build_blocks(str(txt), tokenizer, num_samples=20, seq_len=5),
        "jsonl": build_blocks(
            str(jsonl), tokenizer, num_samples=20, seq_len=5, text_column="body"
        ),
        "parquet": build_blocks(
            str(parquet), tokenizer, num_samples=20, seq_len=5, text_column="body"
        ),
    }
    reference = built["txt"].tokens
    assert reference.shape[0] > 0
    for name, blocks in built.items():
        assert torch.equal(blocks.tokens, reference), name
        assert blocks.description["source"] == "local"
        assert blocks.description["source_fingerprint"].startswith("sha256:")
        json.dumps(blocks.description)
    assert list(load_rows(str(jsonl), text_column="body")["body"]) == texts


def test_txt_documents_are_separated_by_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "para.txt"
    path.write_text("t1 t2\nt3\n\n\n  \nt4\r\n\r\nt5\n", encoding="utf-8")
    assert list(load_rows(str(path))["text"]) == ["t1 t2\nt3", "t4", "t5"]


def test_chat_rows_use_the_chat_template(tmp_path: Path) -> None:
    conversations = [
        [
            {"role": "user", "content": words(n, n + 1)},
            {"role": "assistant", "content": words(n + 2)},
        ]
        for n in range(12)
    ]
    path = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": c} for c in conversations]
    )
    tokenizer = word_tokenizer(chat=True)
    # This template places no <s>; the paper's packing keeps the blocks exactly
    # the rendered chats.
    blocks = build_blocks(
        str(path), tokenizer, num_samples=12, seq_len=7, bos_per_block=False
    )
    assert blocks.description["chat"] is True
    assert blocks.description["text_column"] == "messages"
    order = datasets.Dataset.from_dict({"i": list(range(12))}).shuffle(seed=42)["i"]
    expected = [
        tokenizer(
            tokenizer.apply_chat_template(conversations[i], tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for i in order
    ]
    # user tA tB </s> assistant tC </s>: the template's own </s>, no extra BOS.
    assert expected[0] == [
        200,
        10 + order[0],
        11 + order[0],
        EOS,
        201,
        12 + order[0],
        EOS,
    ]
    assert blocks.tokens.tolist() == expected


def test_chat_rows_need_a_chat_template(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": words(1)}]}],
    )
    with pytest.raises(CalibrationDataError, match="no chat template"):
        build_blocks(str(path), word_tokenizer(), seq_len=2)


def test_missing_text_column_lists_the_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"body": words(1), "id": 1}])
    with pytest.raises(CalibrationDataError) as error:
        build_blocks(str(path), word_tokenizer())
    message = str(error.value)
    assert "no column 'text'" in message and "['body', 'id']" in message
    assert "text_column" in message
    with pytest.raises(CalibrationDataError, match=r"no column 'content'.*'body'"):
        load_rows(str(path), text_column="content")


def test_non_text_column_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "num.jsonl", [{"text": 1}, {"text": 2}])
    with pytest.raises(CalibrationDataError, match=r"column 'text'.*int64"):
        load_rows(str(path))


@pytest.mark.parametrize("name", ["rows.csv", "rows.json", "folder"])
def test_unsupported_local_paths(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "folder":
        path.mkdir()
    else:
        path.write_text("text\nt1\n")
    with pytest.raises(CalibrationDataError) as error:
        load_rows(str(path))
    message = str(error.value)
    assert str(path) in message and ".txt, .jsonl, .parquet" in message


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.txt", "missing.csv"])
def test_missing_local_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(CalibrationDataError, match="does not exist") as error:
        build_blocks(str(path), word_tokenizer())
    assert str(path) in str(error.value)


def test_malformed_jsonl_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "t1"}\nnot json\n')
    with pytest.raises(CalibrationDataError, match=r"bad\.jsonl.*JSON object"):
        load_rows(str(path))


def test_split_is_refused_for_a_local_file(tmp_path: Path) -> None:
    path = write_txt(tmp_path / "x.txt", [words(1)])
    with pytest.raises(CalibrationDataError, match="split 'validation'"):
        load_rows(str(path), split="validation")


def test_unreachable_hub_dataset_fails_fast_and_suggests_builtin() -> None:
    # Tests run offline (HF_HUB_OFFLINE=1): datasets refuses at once.
    start = time.perf_counter()
    with pytest.raises(CalibrationDataError) as error:
        load_rows("mergekit-aim-tests/no-such-dataset")
    assert time.perf_counter() - start < 20
    message = str(error.value)
    assert "'mergekit-aim-tests/no-such-dataset'" in message
    assert "split 'train'" in message
    assert "--dataset builtin" in message and ".jsonl" in message


def test_dataset_names_resolve() -> None:
    resolve = data._resolve_source
    assert resolve("pile-val", None) == data._Source(
        "hub", "mit-han-lab/pile-val-backup", "validation"
    )
    assert resolve("builtin", None) == data._Source("builtin", "builtin", "all")
    assert resolve("org/name", None) == data._Source("hub", "org/name", "train")
    assert resolve("org/name", "test").split == "test"


# --------------------------------------------------------------------------
# builtin source and fingerprints


def test_builtin_source() -> None:
    tokenizer = bpe_tokenizer()
    blocks = build_blocks("builtin", tokenizer, num_samples=6, seq_len=1024)
    assert isinstance(blocks, CalibrationBlocks)
    assert blocks.tokens.shape[1] == 1024 and blocks.tokens.shape[0] >= 1
    assert blocks.num_texts == 6
    description = blocks.description
    assert description["source_fingerprint"] == f"builtin:{builtin_fingerprint()}"
    assert description["split"] == "all" and description["text_column"] == "text"
    json.dumps(description)
    heldout = build_blocks(
        "builtin", tokenizer, num_samples=6, seq_len=1024, split="heldout"
    )
    assert heldout.description["split"] == "heldout"
    assert heldout.fingerprint != blocks.fingerprint
    assert len(load_rows("builtin", split="heldout")) == len(
        builtin_documents(split="heldout")
    )
    with pytest.raises(CalibrationDataError, match="'valid'"):
        load_rows("builtin", split="valid")


def test_fingerprint_follows_the_data(tmp_path: Path) -> None:
    texts = [words(n, n + 1, n + 2) for n in range(20)]
    first = write_txt(tmp_path / "a.txt", texts)
    moved = write_txt(tmp_path / "b.txt", texts)
    changed = write_txt(tmp_path / "c.txt", [*texts[:-1], words(90, 91, 92)])
    tokenizer = word_tokenizer()

    def fingerprint(path: Path, **settings: Any) -> str:
        settings = {"num_samples": 20, "seq_len": 5, **settings}
        return build_blocks(str(path), tokenizer, **settings).fingerprint

    reference = fingerprint(first)
    assert fingerprint(first) == reference
    assert fingerprint(moved) == reference  # same contents, another place
    assert fingerprint(changed) != reference
    assert fingerprint(first, seed=1) != reference
    assert fingerprint(first, seq_len=6) != reference
