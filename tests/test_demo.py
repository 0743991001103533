"""`mergekit-aim demo --toy --quick`: the whole offline pipeline, end to end."""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_aim.demo import toy as demo


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return demo.run_demo(tmp_path_factory.mktemp("demo"), quick=True, seed=0)


def test_table_has_every_model_and_domain(result):
    assert tuple(result.losses) == demo.ROWS
    for row in demo.ROWS:
        assert tuple(result.losses[row]) == (*demo.DOMAINS, "mean")
        assert all(math.isfinite(v) and v > 0 for v in result.losses[row].values())
        mean = sum(result.losses[row][d] for d in demo.DOMAINS) / len(demo.DOMAINS)
        assert result.losses[row]["mean"] == pytest.approx(mean)
    for column, change in result.relative_change.items():
        ties = result.losses[demo.TIES][column]
        aim = result.losses[demo.TIES_AIM][column]
        assert change == pytest.approx((aim - ties) / ties)


def test_experts_beat_the_base_on_their_own_domain(result):
    base = result.losses[demo.BASE]
    assert result.losses[demo.EXPERT_PROSE]["prose"] < base["prose"]
    assert result.losses[demo.EXPERT_CODE]["code"] < base["code"]


def test_aim_merge_differs_from_plain_merge(result):
    plain = load_file(result.models[demo.TIES] / "model.safetensors")
    relaxed = load_file(result.models[demo.TIES_AIM] / "model.safetensors")
    assert plain.keys() == relaxed.keys()
    changed = [n for n in plain if not torch.equal(plain[n], relaxed[n])]
    assert any(n.endswith("mlp.down_proj.weight") for n in changed)
    # Embeddings are not relaxed.
    assert "model.embed_tokens.weight" not in changed
    assert result.losses[demo.TIES] != result.losses[demo.TIES_AIM]


def test_outputs_are_written(result):
    out = result.out_dir
    saved = json.loads((out / "results.json").read_text())
    assert saved["losses"] == result.losses
    assert saved["omega"] == demo.OMEGA
    assert result.to_markdown() in (out / "results.md").read_text()
    assert result.importance.is_file()
    plain = yaml.safe_load((out / "configs" / "ties.yml").read_text())
    aim = yaml.safe_load((out / "configs" / "ties_aim.yml").read_text())
    assert "aim" not in plain
    assert aim["aim"] == {"omega": demo.OMEGA, "importance": str(result.importance)}
    assert {k: v for k, v in aim.items() if k != "aim"} == plain
    card = (result.models[demo.TIES_AIM] / "README.md").read_text()
    assert "2502.02421" in card


def test_markdown_table_shape(result):
    lines = result.to_markdown().splitlines()
    assert lines[0] == "| model | prose | code | math | mean |"
    assert len(lines) == 2 + len(demo.ROWS) + 1
    assert lines[-1].startswith("| TIES+AIM vs TIES |")
