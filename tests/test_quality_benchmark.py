"""The quality benchmark's pieces that need no training: task generators and
their answers, exact-match scoring, hypervolume, and the report tables."""

import math
import random

import pytest
import torch

from benchmarks.quality import merging, metrics, report, tasks


def _answer(item):
    return item.answer.strip()


@pytest.mark.parametrize("seed", range(5))
def test_math_items_have_exact_answers(seed):
    rng = random.Random(seed)
    for _ in range(200):
        item = tasks.math_item(rng)
        numbers = [
            int(w.strip("?.")) for w in item.prompt.split() if w.strip("?.").isdigit()
        ]
        a, b = numbers
        assert 1 <= min(a, b) <= 9 and 10 <= max(a, b) <= 99
        add = "+" in item.prompt or "more" in item.prompt
        assert int(_answer(item)) == (a + b if add else a - b)
        assert int(_answer(item)) >= 0
        assert item.prompt.endswith("Answer:") and item.answer.startswith(" ")


EXPECTED = {
    "reverse": lambda chars: " ".join(chars[::-1]),
    "uppercase": lambda chars: " ".join(c.upper() for c in chars),
    "sort": lambda chars: " ".join(sorted(chars, key=int)),
    "count": lambda chars: str(len(chars)),
    "largest": lambda chars: str(max(int(c) for c in chars)),
}


@pytest.mark.parametrize("kind", sorted(tasks.INSTRUCTIONS))
def test_instruction_answers(kind):
    rng = random.Random(kind)
    for _ in range(100):
        item = tasks.instruction_item(rng, kind=kind)
        chars = item.prompt.split("\n")[0].rsplit(": ", 1)[1].split()
        assert 3 <= len(chars) <= 5
        expected = EXPECTED[kind](chars)
        assert _answer(item) == expected
        assert tasks.is_correct(item, f"  {expected} ")
        assert not tasks.is_correct(item, expected + " x")


def test_fixed_instruction_examples():
    assert tasks.is_correct(tasks.Item("p", " c b a"), "c  b a")
    assert not tasks.is_correct(tasks.Item("p", " c b a"), "cba")
    rng = random.Random(0)
    item = tasks.instruction_item(rng, kind="sort", min_len=4, max_len=4)
    digits = item.prompt.split("\n")[0].rsplit(": ", 1)[1].split()
    assert _answer(item).split() == sorted(digits)


def test_item_splits_are_disjoint_and_deterministic():
    splits = tasks.item_splits(
        tasks.math_item, train=300, validation=30, test=50, seed=1
    )
    again = tasks.item_splits(
        tasks.math_item, train=300, validation=30, test=50, seed=1
    )
    assert splits == again
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (
        300,
        30,
        50,
    )
    held = {i.prompt for i in splits.validation} | {i.prompt for i in splits.test}
    assert len(held) == 80
    assert not held & {i.prompt for i in splits.train}


def test_text_splits_are_disjoint():
    texts = [f"text {i} " * 10 for i in range(100)]
    validation, test = tasks.text_splits(texts, validation=300, test=500, seed=0)
    assert validation and test and not set(validation) & set(test)
    assert 300 <= sum(map(len, validation)) < 400
    assert 500 <= sum(map(len, test)) < 600


@pytest.fixture(scope="module")
def tokenizer():
    from benchmarks.synthetic import generate_sentences
    from mergekit_aim.demo.models import train_tokenizer

    rng = random.Random(0)
    texts = generate_sentences(100, seed=0)
    texts += [tasks.math_item(rng).text for _ in range(100)]
    texts += [tasks.instruction_item(rng).text for _ in range(100)]
    return train_tokenizer(texts, vocab_size=300, split_digits=True)


class _Scripted(torch.nn.Module):
    """Logits favouring ``script[pos]`` at each position (``<unk>`` elsewhere)."""

    def __init__(self, vocab, script):
        super().__init__()
        self.vocab, self.script = vocab, script

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., 3] = 0.5
        for pos, token in self.script.items():
            logits[:, pos, token] = 1.0
        return type("Out", (), {"logits": logits})


def test_exact_match_needs_every_answer_token_and_the_end(tokenizer):
    item = tasks.Item("Question: What is 12 + 3?\nAnswer:", " 15")
    data = metrics.ExactMatchSet.build(tokenizer, [item])
    start, end, ids = data.starts[0], data.ends[0], data.ids[0]
    assert end - start == 4  # space, 1, 5, </s>
    script = {pos: int(ids[pos + 1]) for pos in range(start - 1, end - 1)}
    vocab = len(tokenizer)
    assert metrics.exact_match(_Scripted(vocab, script), data) == 1.0
    for missing in script:
        partial = {k: v for k, v in script.items() if k != missing}
        assert metrics.exact_match(_Scripted(vocab, partial), data) == 0.0


def test_prompt_must_end_at_a_token_boundary(tokenizer):
    with pytest.raises(ValueError, match="prefix"):
        metrics.ExactMatchSet.build(tokenizer, [tasks.Item("Answ", "er: 2")])


def test_hypervolume_fixed_numbers():
    assert metrics.hypervolume([], [0, 0]) == 0
    assert metrics.hypervolume([[1, 1]], [0, 0]) == pytest.approx(1)
    assert metrics.hypervolume([[2, 1], [1, 2]], [0, 0]) == pytest.approx(3)
    # A dominated point adds nothing; one below the reference adds nothing.
    assert metrics.hypervolume([[2, 1], [1, 2], [1, 1], [3, -1]], [0, 0]) == (
        pytest.approx(3)
    )
    assert metrics.hypervolume([[2, 1], [1, 2]], [0.5, 0.5]) == pytest.approx(1.25)
    cube = [[1, 1, 1]]
    assert metrics.hypervolume(cube, [0, 0, 0]) == pytest.approx(1)
    # Union of [0,2]×[0,1]×[0,1] and [0,1]×[0,1]×[0,2]: 2 + 2 − 1.
    assert metrics.hypervolume([[2, 1, 1], [1, 1, 2]], [0, 0, 0]) == pytest.approx(3)
    four = [[1, 1, 1, 1], [2, 0.5, 1, 1]]
    assert metrics.hypervolume(four, [0] * 4) == pytest.approx(1 + 0.5)


def test_hypervolume_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(6, 3, generator=gen)
    exact = metrics.hypervolume(points.tolist(), [0, 0, 0])
    samples = torch.rand(200_000, 3, generator=gen)
    covered = (samples[:, None, :] <= points[None]).all(-1).any(-1).float().mean()
    assert exact == pytest.approx(float(covered), abs=0.01)


def test_reference_point():
    points = [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]
    assert metrics.reference_point(points) == pytest.approx([-0.2, 0.95])


def test_pareto_front():
    points = [[1, 0], [0, 1], [0.5, 0.5], [0.4, 0.4], [1, 0]]
    assert metrics.pareto_front(points) == [0, 1, 2, 4]


def test_normalized_scores():
    base = {"code": 3.0, "math": 0.0, "instructions": 0.1, "general": 2.0}
    experts = {
        "code": {"code": 2.0, "math": 0.0, "instructions": 0.0, "general": 2.5},
        "math": {"code": 3.5, "math": 0.8, "instructions": 0.0, "general": 3.0},
        "instructions": {"code": 3.2, "math": 0.0, "instructions": 0.9, "general": 2.6},
    }
    merged = {"code": 2.5, "math": 0.4, "instructions": 0.5, "general": 2.5}
    scores = metrics.normalized_scores(merged, base, experts, tasks.TASKS)
    assert scores == pytest.approx(
        {"code": 0.5, "math": 0.5, "instructions": 0.5, "general": 0.5}
    )


def _rows():
    def row(variant, metrics_, method="ties", experts=("math", "code"), **kw):
        base = dict(
            method=method,
            experts=list(experts),
            aim=variant == "aim",
            omega=kw.get("omega", 1.0),
            seed=kw.get("seed", 0),
            weights=kw.get("weights", "1"),
            variant=variant,
            metrics=metrics_,
        )
        return base

    m = lambda c, a, i, g: dict(code=c, math=a, instructions=i, general=g)  # noqa: E731
    return [
        row("base", m(3.0, 0.0, 0.0, 2.0), method="base", experts=()),
        row("expert", m(2.0, 0.0, 0.0, 3.0), method="expert", experts=("code",)),
        row("expert", m(3.0, 0.5, 0.0, 3.0), method="expert", experts=("math",)),
        row(
            "expert", m(3.0, 0.0, 0.5, 2.5), method="expert", experts=("instructions",)
        ),
        row("plain", m(2.5, 0.2, 0.0, 2.8)),
        row("aim", m(2.4, 0.3, 0.0, 2.4), omega=0.4),
        row("uniform", m(2.6, 0.2, 0.0, 2.6), omega=0.4),
        row("permuted", m(2.6, 0.1, 0.0, 2.6), omega=0.4),
        row("tuned", m(2.4, 0.3, 0.0, 2.4), omega=0.4),
    ]


def test_relative_change_table_on_fixed_numbers():
    table = report.relative_change_table(_rows(), 0.4)
    lines = table.splitlines()
    assert lines[0].startswith("| experts | method | weights | code loss")
    # code 2.5 -> 2.4 (loss down 4%), math 0.2 -> 0.3 (+50%), instructions 0 -> 0
    # (no relative change defined), general 2.8 -> 2.4 (+14.3%).
    assert lines[2] == "| math+code | TIES | 1 | +4.0% | +50.0% | n/a | +14.3% |"
    assert math.isnan(metrics.relative_change(1.0, 0.0, higher_is_better=True))
    assert metrics.relative_change(2.0, 2.5, higher_is_better=False) == pytest.approx(
        0.2
    )


def test_hypervolumes_and_report_sections():
    rows = _rows()
    volumes = report.hypervolumes(rows, 0.4)
    # Normalized (math, code, general): plain (0.4, 0.5, 0.2), AIM (0.6, 0.6,
    # 0.6); over all variants each axis spans [0.2, 0.6], [0.4, 0.6], [0.2, 0.6],
    # so the reference point is the minimum less 10% of the span, at least 0.05.
    reference = volumes["math+code"]["reference"]
    assert reference == pytest.approx({"math": 0.15, "code": 0.35, "general": 0.15})
    assert volumes["math+code"]["plain"] == pytest.approx(0.25 * 0.15 * 0.05)
    assert volumes["math+code"]["aim"] == pytest.approx(0.45 * 0.25 * 0.45)
    assert "+2600.0%" in report.hypervolume_table(volumes)
    summary = report.controls_summary(rows, 0.4)
    assert summary.splitlines()[2].startswith("| aim | 1 |")


def test_controls_call_the_kernel_formula():
    from fixtures.reference import aim_factors

    from mergekit_aim.importance import ImportanceMap

    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 4, generator=gen), "n": torch.randn(4, generator=gen)}
    merged = {k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()}
    stat = torch.tensor([1.0, 2.0, 4.0, 8.0])
    imap = ImportanceMap({"w": stat, "n": stat}, {"w": 1, "n": 1}, {"w": -1, "n": -1})
    omega = 0.4
    factors = aim_factors(stat, omega, dtype=torch.float32)
    assert merging.aim_factors(imap, "w", omega) == pytest.approx(factors.tolist())
    uniform = merging.uniform_state(base, merged, imap, omega)
    expected = base["w"] + (merged["w"] - base["w"]) * factors.mean()
    torch.testing.assert_close(uniform["w"], expected)
    aim = merging.aim_state(base, merged, imap, omega)
    torch.testing.assert_close(
        aim["w"], base["w"] + (merged["w"] - base["w"]) * factors
    )
    permuted = merging.permuted_state(base, merged, imap, omega, seed=3)
    ratio = (permuted["w"] - base["w"]) / (merged["w"] - base["w"])
    assert sorted(ratio[0].tolist()) == pytest.approx(sorted(factors.tolist()))
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-5)
    assert merged["w"] is not uniform["w"]


def test_merge_grid_and_configs(tmp_path):
    grid = merging.merge_grid(
        [("code", "math"), ("code", "math", "instructions")], (0, 1, 2)
    )
    # TIES once per set: it normalizes by the weights, 1/k is its weight-1 merge
    assert len(grid) == 2 * (2 * (1 + 3 + 3) + 1)
    assert not [g for g in grid if g.method == "ties" and g.weights == "1/k"]
    assert len({g.name for g in grid}) == len(grid)
    spec = merging.MergeSpec("dare_ties", ("code", "math", "instructions"), "1/k", 2)
    config = merging.merge_config(
        spec, tmp_path / "b", {e: tmp_path / e for e in spec.experts}, 0.5
    )
    assert config["merge_method"] == "dare_ties"
    assert [m["parameters"] for m in config["models"]] == [
        {"weight": pytest.approx(1 / 3), "density": 0.5}
    ] * 3


def test_train_completions_scores_only_the_answer(tokenizer, monkeypatch):
    from benchmarks.quality.training import train_completions
    from benchmarks.synthetic import generate_sentences
    from mergekit_aim.demo.models import tiny_llama

    model = tiny_llama(len(tokenizer), hidden_size=32, seed=0)
    seen = []
    forward = type(model).forward

    def spy(self, **batch):
        seen.append({k: v.clone() for k, v in batch.items()})
        return forward(self, **batch)

    monkeypatch.setattr(type(model), "forward", spy)
    items = [tasks.math_item(random.Random(i)) for i in range(4)]
    replay = generate_sentences(40, seed=0)
    losses = train_completions(
        model,
        tokenizer,
        [(i.prompt, i.answer) for i in items],
        steps=2,
        batch_size=2,
        replay=replay,
        replay_batch_size=1,
        replay_seq_len=16,
    )
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    items_batch, replay_batch = seen[0], seen[1]
    for row, labels in zip(items_batch["input_ids"], items_batch["labels"]):
        scored = row[labels != -100].tolist()
        assert scored[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(scored[:-1])
        assert any(text == i.answer for i in items)
    assert torch.equal(replay_batch["input_ids"], replay_batch["labels"])
    with pytest.raises(ValueError, match="prefix"):
        train_completions(model, tokenizer, [("Answ", "er: 2")], steps=1)


def _block_rows():
    """Two merges scored block by block: AIM lowers general loss by 0.1 nats on
    every block of the first and raises it by 0.1 on the second."""

    def row(variant, general, key_seed, omega=1.0):
        blocks = {
            "code": [2.0, 2.0],
            "math": [1.0, 0.0, 1.0],
            "instructions": [0.0, 0.0, 1.0],
            "general": general,
        }
        return dict(
            method="ties",
            experts=["code", "math"],
            aim=variant == "aim",
            omega=omega,
            seed=key_seed,
            weights="1",
            variant=variant,
            metrics={t: sum(v) / len(v) for t, v in blocks.items()},
            blocks=blocks,
        )

    return [
        row("plain", [3.0, 2.0, 4.0], 0),
        row("aim", [2.9, 1.9, 3.9], 0, omega=0.4),
        row("plain", [3.0, 2.0, 4.0], 1),
        row("aim", [3.1, 2.1, 4.1], 1, omega=0.4),
    ]


def test_block_differences_are_oriented_and_paired():
    diffs = report.block_differences(_block_rows(), "aim", "plain", 0.4)
    # general is a loss: lower is better, so a 0.1 drop is +0.1.
    (first, d0), (second, d1) = diffs["general"]
    assert first[3] == 0 and second[3] == 1
    assert d0 == pytest.approx([0.1] * 3)
    assert d1 == pytest.approx([-0.1] * 3)
    # instructions are not in the expert set: no differences for them.
    assert "instructions" not in diffs
    assert diffs["math"][0][1] == [0.0, 0.0, 0.0]


def test_bootstrap_interval():
    mean_, low, high = report.bootstrap_interval([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3]])
    assert (mean_, low, high) == pytest.approx((0.2, 0.2, 0.2))
    # A block-to-block spread gives an interval around the mean that shrinks
    # with more blocks, and is the same for the same seed.
    gen = torch.Generator().manual_seed(0)
    few = (0.05 + torch.randn(1, 20, generator=gen)).tolist()
    many = (0.05 + torch.randn(1, 2000, generator=gen)).tolist()
    m1, l1, h1 = report.bootstrap_interval(few)
    m2, l2, h2 = report.bootstrap_interval(many)
    assert l1 < m1 < h1 and l2 < m2 < h2
    assert (h2 - l2) < (h1 - l1) / 4
    assert report.bootstrap_interval(few) == (m1, l1, h1)


def test_effect_table_reports_wins_ties_losses():
    table = report.effect_table(_block_rows(), 0.4)
    lines = [line for line in table.splitlines() if "aim − plain" in line]
    general = next(line for line in lines if "general loss" in line)
    # one merge better, one worse: mean 0, record 1-0-1
    assert "| 2 | all | +0.0000 |" in general and general.endswith("| 1–0–1 |")
    math_line = next(line for line in lines if "math EM" in line)
    assert math_line.endswith("| 0–2–0 |")


def test_importance_spread_tells_flat_from_peaked():
    from mergekit_aim.importance import ImportanceMap

    flat = torch.ones(100)
    peaked = torch.ones(100)
    peaked[:2] = 50.0
    imap = ImportanceMap(
        {"flat": flat, "peaked": peaked},
        {"flat": 10, "peaked": 10},
        {"flat": -1, "peaked": -1},
    )
    spread = report.importance_spread(imap)
    assert spread["tensors"] == 2
    # quantiles [min, 10%, median, 90%, max] over the two tensors
    assert spread["mean_s"][0] == pytest.approx((2 * 1.0 + 98 * 0.02) / 100)
    assert spread["mean_s"][-1] == pytest.approx(1.0)
    assert spread["max_over_median"][0] == pytest.approx(1.0)
    assert spread["max_over_median"][-1] == pytest.approx(50.0)
    assert spread["share_above_half"][0] == pytest.approx(0.02)
    assert "max / median of a" in report.importance_table(spread)


def test_real_model_settings():
    from benchmarks.quality import __main__ as runner
    from benchmarks.quality import training

    real = runner.settings_for(model="smollm2-135m")
    assert real.model == "smollm2-135m" and real.base_steps == 0
    assert set(real.methods) == {"task_arithmetic", "ties", "dare_ties"}
    assert len(real.dare_seeds) >= 2 and real.pairs
    # judged through lm-eval, tuned with skill floors, the split ω beside it
    assert real.scorer == "lm-eval" and real.split_omegas
    assert dict(real.keep).keys() == set(tasks.EXPERT_TASKS)
    # the calibration split never overlaps a test text
    assert real.calibration_split == "train"
    assert real.training_key() != training.FULL.training_key()
    with pytest.raises(ValueError, match="does not combine"):
        runner.settings_for(quick=True, model="smollm2-135m")
    with pytest.raises(ValueError, match="no real-model settings"):
        runner.settings_for(model="nope")
    assert runner.settings_for() is training.FULL


def test_a_split_row_is_relaxed_when_either_omega_is():
    from benchmarks.quality.__main__ import _row

    empty = ({}, {})
    assert _row("tuned-split", empty, omega=1.0, omega_mlp=0.0)["aim"] is True
    assert _row("tuned-split", empty, omega=0.4, omega_mlp=1.0)["aim"] is True
    assert _row("tuned-split", empty, omega=1.0, omega_mlp=1.0)["aim"] is False
    assert _row("tuned", empty, omega=1.0)["aim"] is False


def test_gemma_settings_train_two_expert_seeds():
    from dataclasses import replace

    from benchmarks.quality import __main__ as runner

    gemma = runner.settings_for(model="gemma3-270m")
    assert gemma.scorer == "lm-eval" and gemma.calibration_split == "train"
    assert {"task_arithmetic", "ties"} <= set(gemma.methods)
    assert gemma.training_seeds() == (0, 1)
    # each seed trains its own experts; the seed list itself is not a key
    keys = {gemma.for_seed(s).training_key() for s in gemma.training_seeds()}
    assert len(keys) == 2 and gemma.for_seed(0).training_key() in keys
    assert gemma.for_seed(1).expert_seeds == () and gemma.for_seed(1).seed == 1
    # without expert seeds the run is unchanged: one seed, the settings' own
    smol = runner.settings_for(model="smollm2-135m")
    assert smol.training_seeds() == (smol.seed,)
    assert smol.for_seed(smol.seed) == smol
    # a row's seed is either the experts' or DARE's, never both
    with pytest.raises(ValueError, match="expert_seeds and DARE"):
        replace(gemma, methods=("dare_ties",))
    with pytest.raises(ValueError, match="real pretrained base"):
        replace(gemma, model=None)


def test_expert_references_average_over_training_seeds():
    rows = _rows()
    rows[1]["seed"] = 0
    extra = dict(rows[1], seed=1, metrics=dict(rows[1]["metrics"], code=1.0))
    base, experts = report.references([*rows, extra])
    assert experts["code"]["code"] == pytest.approx(1.5)
    assert experts["math"] == rows[2]["metrics"]
    table = report.references_table([*rows, extra])
    assert "expert: code (seed 0)" in table and "expert: code (seed 1)" in table


def test_code_blocks_start_with_bos_for_models_that_need_one(tokenizer):
    from benchmarks.quality import training

    settings = training.REAL["gemma3-270m"]
    assert training.block_bos(settings, tokenizer) == tokenizer.bos_token_id
    assert training.block_bos(training.REAL["smollm2-135m"], tokenizer) is None
    assert training.block_bos(training.QUICK, tokenizer) is None
    from mergekit_aim.demo import models as demo_models

    seen = {}

    def capture(model, next_batch, **kwargs):
        seen["ids"] = next_batch()["input_ids"]
        return [0.0]

    texts = [tasks.math_item(random.Random(i)).text for i in range(60)]
    monkey = pytest.MonkeyPatch()
    with monkey.context() as patch:
        patch.setattr(demo_models, "run_training", capture)
        demo_models.train_causal_lm(
            None,
            tokenizer,
            texts,
            steps=1,
            seq_len=16,
            batch_size=4,
            bos_token_id=tokenizer.bos_token_id,
        )
    assert (seen["ids"][:, 0] == tokenizer.bos_token_id).all()


def test_freeze_stops_named_parameters_and_refuses_unknown_names():
    from benchmarks.quality import training
    from mergekit_aim.demo.models import tiny_llama

    model = tiny_llama(64, hidden_size=16, num_layers=1, seed=0)
    training.freeze(model, ["model.embed_tokens.weight"])
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert grads.pop("model.embed_tokens.weight") is False
    assert all(grads.values())
    with pytest.raises(ValueError, match="lacks"):
        training.freeze(model, ["model.nope.weight"])
    # the Gemma run freezes its tied embedding; the key records it
    gemma = training.REAL["gemma3-270m"]
    assert gemma.frozen == ("model.embed_tokens.weight",)
    from dataclasses import replace

    assert replace(gemma, frozen=()).training_key() != gemma.training_key()
