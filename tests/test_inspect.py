"""`mergekit-aim inspect`'s logic (mergekit_aim.inspection) on hand-made
artifacts: the figures, the verdicts, the comparison and its refusal."""

import math

import pytest
import torch

from mergekit_aim import inspection
from mergekit_aim.errors import ImportanceError
from mergekit_aim.importance import ImportanceMap

FINGERPRINT = "f" * 64


def make_map(vectors, *, tokens=10_000, fingerprint=FINGERPRINT, **provenance):
    """An ImportanceMap whose per-token means are ``vectors``."""
    return ImportanceMap(
        {
            n: torch.as_tensor(v, dtype=torch.float32) * tokens
            for n, v in vectors.items()
        },
        {n: tokens for n in vectors},
        {n: -1 for n in vectors},
        {
            "base_model": "org/model",
            "base_fingerprint": fingerprint,
            "file": f"/artifacts/{provenance.pop('file', 'a')}.safetensors",
            "calibration": {
                "dataset": "builtin",
                "num_texts": 8,
                "num_blocks": 4,
                "seq_len": 512,
                "seed": 42,
                "dtype": "auto",
            },
            "created": "2025-01-02 03:04 UTC",
            "model_dtype": "bfloat16",
            "mergekit_aim_version": "0.1.0",
            **provenance,
        },
    )


def peaked(n=256, outliers=3, seed=0):
    """A trained model's shape: uniform-ish channels plus a few 50x outliers."""
    g = torch.Generator().manual_seed(seed)
    a = 1 + 0.2 * torch.rand(n, generator=g)
    a[torch.randperm(n, generator=g)[:outliers]] *= 50
    return a


def flat(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1 + 0.5 * torch.rand(n, generator=g)


def test_tensor_figures_follow_their_definitions():
    a = torch.ones(100)
    a[:2] = torch.tensor([20.0, 9.0])  # above 8x the median (1)
    a[2] = 7.0  # below
    (stats,) = inspection.tensor_stats(
        make_map({"model.layers.4.mlp.down_proj.weight": a})
    )
    assert stats.layer == 4 and stats.channels == 100 and stats.tokens == 10_000
    assert stats.outliers == 2
    assert stats.max_over_median == pytest.approx(20.0)
    assert stats.mean_s == pytest.approx(float((a / 20).mean()))
    assert not stats.flat
    assert inspection.tensor_stats(make_map({"x.weight": flat()}))[0].flat


def test_layers_are_grouped_by_index_with_the_rest_last():
    imap = make_map(
        {
            "lm_head.weight": peaked(),
            "model.layers.10.mlp.up_proj.weight": peaked(),
            "model.layers.2.mlp.up_proj.weight": peaked(),
            "model.layers.2.self_attn.q_proj.weight": flat(),
        }
    )
    rows = inspection.layer_stats(inspection.tensor_stats(imap))
    assert [r.layer for r in rows] == ["2", "10", "other"]
    assert rows[0].tensors == 2 and rows[0].flat == 1 and rows[0].outliers == 3


def test_verdicts():
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(8)]
    flat_map = make_map({n: flat(seed=i) for i, n in enumerate(names)})
    peaked_map = make_map({n: peaked(seed=i) for i, n in enumerate(names)})
    assert "nearly flat: AIM will act like a uniform scaling" in inspection.verdict(
        inspection.tensor_stats(flat_map)
    )
    text = inspection.verdict(inspection.tensor_stats(peaked_map))
    assert text.startswith("statistic is peaked") and "8 with outlier" in text
    few = make_map({n: peaked(seed=i) for i, n in enumerate(names)}, tokens=512)
    assert "Only 512 calibration tokens" in inspection.verdict(
        inspection.tensor_stats(few)
    )


def test_describe_names_provenance_layers_and_verdict():
    imap = make_map(
        {f"model.layers.{i}.mlp.down_proj.weight": peaked(seed=i) for i in range(3)},
        skipped={"lm_head.weight": "tied to the input embedding (not relaxed)"},
    )
    text = inspection.describe(imap)
    for expected in (
        "org/model (fingerprint ffffffffffff…)",
        "builtin, 8 texts in 4 blocks of 512 tokens, seed 42",
        "auto (ran in bfloat16)",
        "2025-01-02 03:04 UTC",
        "10,000 per tensor",
        "lm_head.weight (tied to the input embedding",
        "tensors      3 in 3 layers",
        "above 8x their tensor's median",
        "verdict: statistic is peaked",
    ):
        assert expected in text, expected
    header = next(line for line in text.splitlines() if line.startswith("layer"))
    assert header.split() == [
        "layer", "tensors", "tokens", "mean", "s", "max/median", "outliers", "flat"
    ]  # fmt: skip
    assert "model.layers.1.mlp.down_proj.weight" not in text
    detailed = inspection.describe(imap, tensors=True)
    assert "model.layers.1.mlp.down_proj.weight" in detailed


def test_average_ranks_share_ties():
    ranks = inspection.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0]))
    assert ranks.tolist() == [3.0, 0.0, 3.0, 1.0, 3.0]


def test_spearman_and_top_overlap():
    x = torch.rand(500, generator=torch.Generator().manual_seed(0))
    assert inspection.spearman(x, x.exp() * 3) == pytest.approx(1.0)
    assert inspection.spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(inspection.spearman(x, torch.ones(500)))
    # The top 1% of 500 is 5 channels; move two of them to the bottom.
    y = x.clone()
    top = torch.topk(x, 5).indices
    y[top[:2]] = -1
    assert inspection.top_overlap(x, y) == pytest.approx(3 / 5)
    assert (
        inspection.top_overlap(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])) == 0
    )


def test_compare_reports_per_tensor_and_verdict():
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)]
    first = make_map({n: peaked(seed=i) for i, n in enumerate(names)}, file="a")
    noise = torch.Generator().manual_seed(9)
    close = make_map(
        {
            n: peaked(seed=i) * (1 + 0.001 * torch.rand(256, generator=noise))
            for i, n in enumerate(names)
        },
        file="b",
    )
    result = inspection.compare(first, close)
    assert [t.name for t in result.tensors] == names
    assert all(t.rank_correlation > 0.99 and t.top_overlap == 1 for t in result.tensors)
    assert result.verdict().startswith("about the same statistic")
    text = result.text()
    assert "/artifacts/a.safetensors" in text and "/artifacts/b.safetensors" in text
    assert "rank corr" in text and "top-1% overlap" in text
    other = make_map({n: peaked(seed=10 + i) for i, n in enumerate(names)}, file="c")
    assert inspection.compare(first, other).verdict().startswith("different")
    summary = inspection.compare(first, other).to_json()
    assert set(summary["tensors"][names[0]]) == {
        "rank_correlation",
        "top1_overlap",
        "max_abs_ds",
    }


def test_compare_refuses_artifacts_of_different_models():
    vectors = {"model.layers.0.mlp.down_proj.weight": peaked()}
    first = make_map(vectors, file="a")
    second = make_map(vectors, fingerprint="0" * 64, file="b")
    with pytest.raises(ImportanceError, match="different models") as error:
        inspection.compare(first, second)
    assert "/artifacts/a.safetensors" in str(error.value)
    assert "/artifacts/b.safetensors" in str(error.value)


def test_help_states_the_definitions_in_use():
    from click.testing import CliRunner

    from mergekit_aim.cli import main

    text = " ".join(CliRunner().invoke(main, ["inspect", "--help"]).output.split())
    assert f"more than {inspection.OUTLIER_FACTOR:g}x its tensor's median" in text
    assert f"max/median is below {inspection.FLAT_RATIO:g}" in text
