"""`mergekit-aim demo` on SmolLM2-135M, with a tiny training and evaluation
budget (the table's numbers mean nothing here; the pipeline is what is
tested): experts cached, calibration from the cache, both merges through
mergekit, one table."""

import json
import math

import pytest
import yaml

from mergekit_aim.demo import real
from mergekit_aim.errors import AimConfigError

pytestmark = [pytest.mark.slow, pytest.mark.real, pytest.mark.extended]

TINY = real.RealSettings(
    steps=1,
    batch_size=2,
    seq_len=32,
    code_chars=2_000,
    math_items=20,
    eval_chars=600,
    eval_items=4,
    eval_seq_len=64,
    calibration_samples=2,
    calibration_seq_len=64,
)


@pytest.fixture(scope="module")
def result(smollm2, tmp_path_factory):
    return real.run_real_demo(
        tmp_path_factory.mktemp("real-demo"), base=smollm2, settings=TINY
    )


def test_table_has_every_model_and_domain(result):
    assert tuple(result.losses) == real.ROWS
    for row in real.ROWS:
        assert tuple(result.losses[row]) == (*real.DOMAINS, "mean")
        assert all(math.isfinite(v) and v > 0 for v in result.losses[row].values())
    lines = result.to_markdown().splitlines()
    assert lines[0] == "| model | code | math | general | mean |"
    assert lines[-1].startswith("| TIES+AIM vs TIES |")
    assert result.losses[real.TIES] != result.losses[real.TIES_AIM]


def test_merges_go_through_mergekit_with_and_without_aim(result, smollm2):
    configs = result.out_dir / "configs"
    plain = yaml.safe_load((configs / "ties.yml").read_text())
    aim = yaml.safe_load((configs / "ties_aim.yml").read_text())
    assert plain["merge_method"] == "ties" and plain["base_model"] == str(smollm2)
    assert aim["aim"] == {"omega": real.OMEGA, "importance": str(result.importance)}
    assert {k: v for k, v in aim.items() if k != "aim"} == plain
    assert "2502.02421" in (result.models[real.TIES_AIM] / "README.md").read_text()
    saved = json.loads((result.out_dir / "results.json").read_text())
    assert saved["losses"] == result.losses and saved["base_model"] == real.MODEL


def test_experts_are_cached_by_settings(result, smollm2):
    root = result.models[real.EXPERT_CODE].parent
    again = real.trained_experts(smollm2, None, None, TINY, root)  # no training
    assert again == {
        "code": result.models[real.EXPERT_CODE],
        "math": result.models[real.EXPERT_MATH],
    }
    record = json.loads((again["code"] / "training.json").read_text())
    assert record["settings"]["steps"] == TINY.steps
    key = TINY.training_key("x" * 64)
    assert key != real.RealSettings(steps=2).training_key("x" * 64)
    # Evaluation settings do not retrain.
    assert key == real.RealSettings(**{**TINY.__dict__, "eval_items": 9}).training_key(
        "x" * 64
    )


def test_missing_base_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(real.REAL_MODELS_ENV, str(tmp_path))
    with pytest.raises(AimConfigError, match="make real-models") as error:
        real.find_base()
    assert "--toy" in str(error.value) and str(tmp_path) in str(error.value)


def test_the_command_stages_its_output_and_names_it(
    result, smollm2, tmp_path, monkeypatch, capsys
):
    # The command's path (mergekit_aim.demo.main): written beside OUT and moved
    # into it, reports and the returned paths naming OUT; experts from the cache
    # the fixture filled.
    from mergekit_aim import demo
    from mergekit_aim.output import PARTIAL

    monkeypatch.setattr(real, "DEFAULT", TINY)
    out = tmp_path / "demo-out"
    ran = demo.main(out, base=smollm2, seed=TINY.seed)
    assert ran.out_dir == out and ran.models[real.TIES_AIM].parent == out / "models"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-out"]
    for report in ("results.md", "results.json"):
        text = (out / report).read_text()
        assert PARTIAL not in text
    assert PARTIAL not in capsys.readouterr().out
