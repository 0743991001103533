"""AIM on a real pretrained model, SmolLM2-135M-Instruct, the way users run it.

The base is calibrated from the CLI (builtin corpus, and chat rows rendered with
the model's own chat template); two seeded variants of it are merged by plain
``mergekit-yaml`` with and without an ``aim:`` block; the AIM merge must be the
DESIGN §1 formula applied to the plain merge on every weight but the
embedding, ``mergekit-aim relax`` must reproduce it, and ``mergekit-aim tune``
must pick an ω and write it. Unlike the tiny models elsewhere in the suite, a
trained model's statistic has outlier channels, and that is checked too.

Sizes are kept small (8–13 calibration texts of at most 128 tokens, a tiny eval
set): the module takes about three minutes on two busy CPU cores, most of it
six CLI runs (two calibrations, two merges, relax, tune).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from fixtures.checkpoint_files import load_dir
from fixtures.reference import aim_factors, aim_reference
from real_checkpoints import assert_relaxed, run_command, seeded_variant

from mergekit_aim.importance import ImportanceMap

pytestmark = [pytest.mark.slow, pytest.mark.real]

SEQ_LEN = 128
OMEGA = 0.4
LAYERS = 30
EMBEDDING = "model.embed_tokens.weight"
# Per decoder layer: 7 linear weights and 2 norms; plus the final norm.
PER_LAYER = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)
EPS = torch.finfo(torch.bfloat16).eps  # one ulp, relative
NORMS = re.compile(r"(layernorm|model\.norm)\.weight$")


def expected_statistics() -> set[str]:
    names = {
        f"model.layers.{i}.{module}.weight"
        for i in range(LAYERS)
        for module in PER_LAYER
    }
    return names | {"model.norm.weight"}


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def chat_rows() -> list[list[dict[str, str]]]:
    """12 short conversations (every third with its own system prompt, the
    others get the template's default one) and a last one whose rendering is
    longer than SEQ_LEN although its bare contents are not."""
    from benchmarks.synthetic import generate_sentences

    sentences = generate_sentences(45, seed=3)
    rows = []
    for i in range(12):
        user, answer = " ".join(sentences[3 * i : 3 * i + 2]), sentences[3 * i + 2]
        row = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
        if i % 3 == 0:
            row.insert(0, {"role": "system", "content": "Answer in one sentence."})
        rows.append(row)
    rows.append(
        [
            {"role": "user", "content": " ".join(sentences[36:44])},
            {"role": "assistant", "content": sentences[44]},
        ]
    )
    return rows


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Iterator[Path]:
    """The module's scratch directory; its ~1.6 GB of checkpoints are removed
    afterwards rather than kept by pytest's last-three-runs retention."""
    path = tmp_path_factory.mktemp("smollm2")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def chat_file(work, chat_rows) -> Path:
    path = work / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in chat_rows))
    return path


def calibrate(base: Path, out: Path, dataset: object, num_samples: int) -> Path:
    run_command(
        "mergekit-aim",
        "calibrate",
        base,
        "-o",
        out,
        "--dataset",
        dataset,
        "--num-samples",
        num_samples,
        "--seq-len",
        SEQ_LEN,
        "--quiet",
    )
    return out


@pytest.fixture(scope="module")
def builtin_artifact(smollm2, work) -> Path:
    return calibrate(smollm2, work / "builtin.safetensors", "builtin", 8)


@pytest.fixture(scope="module")
def chat_artifact(smollm2, work, chat_file, chat_rows) -> Path:
    return calibrate(smollm2, work / "chat.safetensors", chat_file, len(chat_rows))


@pytest.fixture(scope="module")
def variants(smollm2, work) -> list[Path]:
    """Two seeded variants of the base (bf16, with its config and tokenizer)."""
    return [
        seeded_variant(smollm2, work / f"variant-{seed}", seed=seed, scale=0.1)
        for seed in (1, 2)
    ]


def merge_config(base: Path, variants: list[Path], aim: dict | None = None) -> dict:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(v), "parameters": {"weight": 1.0}} for v in variants],
        "dtype": "bfloat16",
    }
    if aim is not None:
        config["aim"] = aim
    return config


@pytest.fixture(scope="module")
def merges(smollm2, variants, builtin_artifact, work) -> dict:
    """The plain merge and the AIM merge (ω = OMEGA, the builtin artifact), by
    plain ``mergekit-yaml``; ``aim_stderr`` is the AIM run's log (-vv)."""
    plain_config = work / "plain.yml"
    plain_config.write_text(yaml.safe_dump(merge_config(smollm2, variants)))
    aim = {"omega": OMEGA, "importance": str(builtin_artifact)}
    aim_config = work / "aim.yml"
    aim_config.write_text(yaml.safe_dump(merge_config(smollm2, variants, aim)))
    run_command("mergekit-yaml", plain_config, work / "plain", "--quiet")
    result = run_command("mergekit-yaml", aim_config, work / "aim", "--quiet", "-vv")
    return {
        "plain_config": plain_config,
        "plain": work / "plain",
        "aim": work / "aim",
        "aim_stderr": result.stderr,
    }


# --- calibration -------------------------------------------------------------


def test_builtin_calibration_measures_every_weight_but_the_embedding(
    builtin_artifact, smollm2
):
    imap = ImportanceMap.load(builtin_artifact)
    assert set(imap) == expected_statistics()
    for name in imap:
        assert imap[name].shape == (576 if "down_proj" not in name else 1536,)
        # Linear weights are [out, in]; a norm's statistic is elementwise.
        axes = (0, -1) if NORMS.search(name) else (-1, 1)
        assert imap.input_axis(name) in axes, name
        assert torch.isfinite(imap[name]).all() and (imap[name] > 0).all(), name
    provenance = imap.provenance
    assert provenance["base_model"] == str(smollm2)
    assert re.fullmatch("[0-9a-f]{64}", provenance["base_fingerprint"])
    assert re.fullmatch("[0-9a-f]{64}", provenance["data_fingerprint"])
    settings = provenance["calibration"]
    assert settings["dataset"] == "builtin" and settings["num_samples"] == 8
    assert settings["seq_len"] == SEQ_LEN
    data = provenance["data"]
    assert data["chat"] is False and data["num_texts"] == 8
    assert data["num_tokens"] == settings["num_blocks"] * SEQ_LEN > 0
    assert all(imap.count(n) == data["num_tokens"] for n in imap)
    # The LM head is tied to the embedding: no statistic, and the reason says so.
    assert provenance["skipped"] == {
        "lm_head.weight": "tied to the input embedding (not relaxed)"
    }


def test_chat_calibration_renders_the_models_chat_template(
    chat_artifact, builtin_artifact, chat_file, chat_rows, tokenizer
):
    # Independently of the data module: render and tokenize each row with the
    # tokenizer's chat template, keep those of at most SEQ_LEN tokens, and cut
    # the concatenation into whole blocks.
    rendered = [
        tokenizer.apply_chat_template(row, tokenize=True, return_dict=False)
        for row in chat_rows
    ]
    bare = [
        tokenizer(" ".join(m["content"] for m in row))["input_ids"] for row in chat_rows
    ]
    kept = [ids for ids in rendered if len(ids) <= SEQ_LEN]
    expected_tokens = sum(map(len, kept)) // SEQ_LEN * SEQ_LEN
    # The check discriminates: without the template the last row would be
    # kept and fewer blocks would be cut.
    assert len(bare[-1]) <= SEQ_LEN < len(rendered[-1])
    assert len(kept) == len(chat_rows) - 1
    assert sum(map(len, bare)) // SEQ_LEN * SEQ_LEN != expected_tokens
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(ids[0] == im_start for ids in rendered)

    chat = ImportanceMap.load(chat_artifact)
    data = chat.provenance["data"]
    assert data["chat"] is True and data["text_column"] == "messages"
    assert data["source"] == "local" and data["num_texts"] == len(kept)
    assert data["num_tokens"] == expected_tokens
    assert chat.provenance["calibration"]["dataset"] == str(chat_file)
    digest = hashlib.sha256(chat_file.read_bytes()).hexdigest()
    assert data["source_fingerprint"] == f"sha256:{digest}"
    assert all(chat.count(n) == expected_tokens for n in chat)

    builtin = ImportanceMap.load(builtin_artifact)
    assert set(chat) == set(builtin)
    assert chat.base_fingerprint == builtin.base_fingerprint
    assert chat.provenance["data_fingerprint"] != builtin.provenance["data_fingerprint"]
    assert not any(torch.allclose(chat.mean(n), builtin.mean(n)) for n in chat)


def outlier_profile(imap: ImportanceMap) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tensor: max/median of the statistic, and the mean of s = a/max(a)."""
    ratios, means = [], []
    for name in sorted(imap):
        a = imap.mean(name)
        ratios.append(a.max() / a.median())
        means.append((a / a.max()).mean())
    return torch.stack(ratios), torch.stack(means)


@pytest.mark.parametrize("which", ["builtin", "chat"])
def test_statistic_has_the_outlier_channels_of_a_trained_model(
    which, builtin_artifact, chat_artifact
):
    """What AIM relies on: a few input channels carry most of |x|, so s is near
    0 for most channels and AIM is a targeted edit, not uniform shrinkage (a
    random or barely trained model's s is close to 1 everywhere)."""
    imap = ImportanceMap.load(
        {"builtin": builtin_artifact, "chat": chat_artifact}[which]
    )
    ratios, means = outlier_profile(imap)
    assert (ratios >= 5).float().mean() >= 0.8, ratios
    assert ratios.median() >= 10
    assert ratios.max() >= 50
    assert means.max() < 0.5, means
    assert means.median() < 0.15


def test_outlier_channels_belong_to_the_model_not_the_data(
    builtin_artifact, chat_artifact
):
    """Code-and-prose builtin text and chat rows pick the same most salient input
    channel for most tensors: the outliers are a property of the weights."""
    builtin = ImportanceMap.load(builtin_artifact)
    chat = ImportanceMap.load(chat_artifact)
    same = [int(builtin[n].argmax() == chat[n].argmax()) for n in builtin]
    assert sum(same) / len(same) >= 0.7, sum(same)


# --- merging -------------------------------------------------------------------


def test_aim_merge_is_the_formula_on_every_weight_but_the_embedding(
    merges, smollm2, builtin_artifact
):
    base, plain = load_dir(smollm2), load_dir(merges["plain"])
    relaxed = load_dir(merges["aim"])
    imap = ImportanceMap.load(builtin_artifact)
    assert set(relaxed) == set(plain) == expected_statistics() | {EMBEDDING}
    assert torch.equal(relaxed[EMBEDDING], plain[EMBEDDING])
    assert not torch.equal(plain[EMBEDDING], base[EMBEDDING])  # a real merge
    tipped = total = 0
    for name in sorted(imap):
        merged = plain[name]
        assert relaxed[name].dtype == merged.dtype == torch.bfloat16
        tipped += assert_relaxed(
            relaxed[name],
            base[name],
            merged,
            imap[name],
            OMEGA,
            imap.input_axis(name),
            name,
        )
        total += merged.numel()
        # The most salient input channel (s = 1) keeps only ω of the merge's
        # change: B + ω·(M − B), up to rounding.
        top = int(imap[name].argmax())
        b, m = base[name].float()[..., top], merged.float()[..., top]
        r = relaxed[name].float()[..., top]
        slack = EPS * r.abs() + 1e-6 * (b.abs() + m.abs())
        assert ((r - (b + OMEGA * (m - b))).abs() <= slack).all(), name
        assert not torch.equal(relaxed[name], merged), name
    # Off by one ulp only where float32 rounding tips a near-tie: rarely.
    assert tipped < 1e-4 * total, (tipped, total)


def test_norms_are_relaxed_elementwise(merges, smollm2, builtin_artifact):
    """Each element of a norm weight has its own s_i (its input is the hidden
    state it scales): the output follows the per-element factor, measurably
    unlike one factor for the whole tensor."""
    base, plain = load_dir(smollm2), load_dir(merges["plain"])
    relaxed = load_dir(merges["aim"])
    imap = ImportanceMap.load(builtin_artifact)
    norms = [n for n in imap if NORMS.search(n)]
    assert len(norms) == 2 * LAYERS + 1
    told_apart = 0
    for name in norms:
        assert base[name].shape == imap[name].shape == (576,)
        args = (base[name], plain[name], imap[name], OMEGA, 0)
        assert_relaxed(relaxed[name], *args, name)
        elementwise = aim_reference(*args, dtype=torch.float32)
        b, m = base[name].float(), plain[name].float()
        uniform = (
            b + (m - b) * aim_factors(imap[name], OMEGA, dtype=torch.float32).mean()
        )
        # Where the two readings differ by more than rounding can explain,
        # the output follows the elementwise one.
        apart = (elementwise - uniform).abs() > 3 * EPS * elementwise.abs()
        got = relaxed[name].float()[apart]
        closer = (got - elementwise[apart]).abs() < (got - uniform[apart]).abs()
        assert closer.all(), name
        told_apart += int(apart.sum())
    # Mostly the few outlier channels of each norm; about 340 in all here.
    assert told_apart >= 100, told_apart


def test_coverage_report_and_card(merges, builtin_artifact):
    log = merges["aim_stderr"]
    assert (
        "AIM coverage: relaxed 271 of 272 tensors (ω 0.4); left alone: 1 no input"
        in log
    )
    # The embedding is the one tensor left alone; the tied LM head is not a
    # tensor of its own (SmolLM2 ties it), so nothing relaxes it either, and
    # the report says so.
    assert "lm_head.weight tied to the input embedding, not relaxed" in log
    assert f"AIM no input statistic: {EMBEDDING}" in log
    assert not any(Path(merges["aim"]).glob("lm_head*"))
    assert "lm_head.weight" not in load_dir(merges["aim"])
    config = json.loads((merges["aim"] / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    card = (merges["aim"] / "README.md").read_text()
    assert "- aim" in card and "2502.02421" in card
    assert (
        "relaxed: 271 of 272 tensors; left alone: 1 no input statistic; "
        "lm_head.weight tied to the input embedding, not relaxed" in card
    )
    assert "dataset=builtin" in card


def test_relax_cli_on_the_plain_merge_equals_the_aim_merge(
    merges, smollm2, builtin_artifact, work
):
    out = work / "relaxed"
    result = run_command(
        "mergekit-aim",
        "relax",
        "--base",
        smollm2,
        "--merged",
        merges["plain"],
        "--importance",
        builtin_artifact,
        "--omega",
        OMEGA,
        out,
    )
    assert "relaxed 271 of 272 tensors at omega 0.4" in result.stdout
    got, aim = load_dir(out), load_dir(merges["aim"])
    assert set(got) == set(aim)
    for name, tensor in aim.items():
        assert torch.equal(got[name], tensor), name
    assert (out / "chat_template.jinja").exists()


def test_tune_picks_an_omega_and_writes_it(merges, smollm2, builtin_artifact, work):
    from benchmarks.synthetic import generate_sentences

    # Two short documents, one 64-token window each: the eval costs little.
    stories = generate_sentences(6, seed=21)
    eval_file = work / "eval.txt"
    eval_file.write_text(" ".join(stories[:3]) + "\n\n" + " ".join(stories[3:]))
    out = work / "tuned"
    result = run_command(
        "mergekit-aim",
        "tune",
        merges["plain_config"],
        "--importance",
        builtin_artifact,
        "--eval",
        f"stories={eval_file}",
        "--omega",
        "0,0.4",
        "--seq-len",
        64,
        "--quiet",
        out,
    )
    report = json.loads((out / "aim_tune.json").read_text())
    rows = report["rows"]
    assert [r["omega_attention"] for r in rows] == [0.0, 0.4, 1.0]
    losses = [r["losses"]["stories"] for r in rows]
    assert len(set(losses)) == 3 and all(0 < x < 20 for x in losses)
    chosen = report["chosen"]
    assert chosen["objective"] == min(r["objective"] for r in rows)
    omega = chosen["omega_attention"]
    assert f"wrote {out} (ω {omega:g})" in result.stdout
    assert "**chosen**" in (out / "aim_tune.md").read_text()
    # The written model is the plain merge relaxed at the chosen ω.
    written, plain = load_dir(out), load_dir(merges["plain"])
    base, imap = load_dir(smollm2), ImportanceMap.load(builtin_artifact)
    assert set(written) == set(plain)
    for name, tensor in written.items():
        if name not in imap:
            assert torch.equal(tensor, plain[name]), name
            continue
        axis = imap.input_axis(name)
        assert_relaxed(tensor, base[name], plain[name], imap[name], omega, axis, name)
    if omega == OMEGA:
        aim = load_dir(merges["aim"])
        assert all(torch.equal(written[n], aim[n]) for n in aim)


def test_tune_scores_lm_eval_tasks_in_memory(merges, builtin_artifact, work):
    """``--lm-eval`` on SmolLM2: the quality benchmark's task YAMLs on
    generated data, offline, every candidate scored on the model in memory,
    a skill floor on exact match and the general objective on bits per byte."""
    pytest.importorskip("lm_eval")
    from benchmarks.quality.lm_eval_tasks import __main__ as tasks

    data = work / "lm-eval-data"
    tasks.main(["--smoke", "--out", str(data)])
    out = work / "tuned-lm-eval"
    result = run_command(
        "mergekit-aim",
        "tune",
        merges["plain_config"],
        "--importance",
        builtin_artifact,
        "--lm-eval",
        "aim_math_validation,aim_general_validation",
        "--lm-eval-include-path",
        Path(tasks.__file__).parent,
        "--lm-eval-limit",
        4,
        "--objective",
        "aim_general_validation/bits_per_byte",
        "--keep",
        "aim_math_validation=0.25",
        "--omega",
        "0",
        "--quiet",
        out,
        MERGEKIT_AIM_LM_EVAL_DATA=str(data),
        HF_DATASETS_OFFLINE="1",
    )
    assert "aim_general_validation/bits_per_byte" in result.stdout
    report = json.loads((out / "aim_tune.json").read_text())
    rows = report["rows"]
    assert [r["omega_attention"] for r in rows] == [0.0, 1.0]
    for row in rows:
        bpb = row["metrics"]["aim_general_validation/bits_per_byte"]
        assert 0 < bpb["value"] < 10 and bpb["higher_is_better"] is False
        assert row["metrics"]["aim_math_validation/exact_match"]["stderr"] is not None
    assert rows[0]["metrics"] != rows[1]["metrics"]  # ω = 0 really is another model
    eligible = [r for r in rows if r["eligible"]]
    best = min(eligible, key=lambda r: (r["objective"], -r["omega_attention"]))
    assert report["chosen"]["omega_attention"] == best["omega_attention"]
    assert report["timing"]["relax_s"] > 0 and report["timing"]["score_s"] > 0
