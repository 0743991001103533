"""The LoRA quality benchmark: its variants move a merged adapter's delta
exactly as the full-merge variants move a merged weight, and the runner
goes end to end at the toy scale."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from benchmarks.quality import lora, merging  # noqa: E402
from benchmarks.quality.merging import MergeSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OMEGA = 0.4


class _Deltas:
    """A scorer that records an adapter's effective delta on each weight."""

    def __init__(self, model):
        self.model = model

    def blocks(self, adapter):
        deltas = {
            key: module.get_delta_weight(adapter).detach()
            for key, module in lora.lora_layers(self.model)
        }
        return deltas, {}


@pytest.fixture
def merged_adapter():
    from peft import LoraConfig, PeftModel, get_peft_model

    from mergekit_aim import collect_importance
    from mergekit_aim.demo.models import tiny_llama

    base = tiny_llama(64, hidden_size=32, num_layers=1, seed=0)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    blocks = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    importance = collect_importance(base, blocks)
    config = LoraConfig(init_lora_weights=False, **{**lora.LORA, "r": 4})
    model = None
    for i, task in enumerate(("code", "math")):
        torch.manual_seed(10 + i)  # init_lora_weights=False: random B too
        if model is None:
            model = get_peft_model(base, config, adapter_name=task)
        else:
            model.add_adapter(task, config)
    assert isinstance(model, PeftModel)
    spec = MergeSpec("lora_dare_ties", ("code", "math"), "1", 0)
    lora.add_merge(model, spec, 0.5)
    return model, spec, state, importance


def test_adapter_variants_are_the_full_merge_variants_on_the_delta(merged_adapter):
    model, spec, base, importance = merged_adapter
    variants = lora.AdapterVariants(model, spec.name, _Deltas(model), importance)
    plain = variants.aim(1.0)[0]
    assert set(plain) == set(variants.plain) and len(plain) == 7
    # The merged weights as a full merge would hold them: base + delta on
    # the adapted linears, the base elsewhere (norms, head: LoRA leaves them).
    merged = {k: v + plain[k] if k in plain else v for k, v in base.items()}
    expected = {
        "aim": merging.aim_state(base, merged, importance, OMEGA),
        "uniform": merging.uniform_state(base, merged, importance, OMEGA),
        "permuted": merging.permuted_state(base, merged, importance, OMEGA),
    }
    got = {"aim": variants.aim(OMEGA)[0]}
    for control in ("uniform", "permuted"):
        got[control] = variants.scaled(
            lambda key, c=control: merging.control_factors(importance, key, OMEGA, c)
        )[0]
    for variant, state in expected.items():
        for key, delta in got[variant].items():
            torch.testing.assert_close(
                delta, state[key] - base[key], rtol=1e-5, atol=1e-6, msg=variant
            )
        assert not torch.allclose(got[variant][key], plain[key])
    variants.restore()
    for key, delta in _Deltas(model).blocks(spec.name)[0].items():
        torch.testing.assert_close(delta, plain[key], rtol=0, atol=0)


def test_dare_merge_is_seeded(merged_adapter):
    model, spec, _, _ = merged_adapter
    first = {k: p.detach().clone() for k, p in lora.lora_a(model, spec.name)}
    model.delete_adapter(spec.name)
    lora.add_merge(model, spec, 0.5)
    again = dict(lora.lora_a(model, spec.name))
    assert all(torch.equal(first[k], again[k]) for k in first)
    # Rank kept: the merged A is [r, in] like each expert's.
    assert {p.shape[0] for p in again.values()} == {4}


def test_reduced_grid_runs_first_seeds_first():
    real = lora.training.REAL["smollm2-135m"]
    settings = lora.lora_settings(real, reduced=True)
    grid = lora.lora_grid(settings, reduced=True)
    assert [s.seed for s in grid] == [0, 0, 0, 0, 1, 1]
    assert {s.weights for s in grid} == {"1"}
    assert {s.method for s in grid} == {"lora_ties", "lora_dare_ties"}
    full = lora.lora_grid(lora.lora_settings(real, reduced=False), reduced=False)
    assert len(full) == 2 * 2 * 3
    assert settings.code_lr == pytest.approx(10 * 5e-5)


def test_smoke_run_end_to_end(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality.lora", "--smoke"]
        + ["--out", str(tmp_path), "--reduced"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    document = json.loads((tmp_path / "quality.json").read_text())
    rows = document["results"]
    assert [r["variant"] for r in rows[:3]] == ["base", "expert", "expert"]
    merges = {(r["method"], r["seed"]) for r in rows if r["variant"] == "plain"}
    assert merges == {("lora_ties", 0), ("lora_dare_ties", 0)}
    for method, seed in merges:
        variants = {
            r["variant"] for r in rows if (r["method"], r["seed"]) == (method, seed)
        }
        assert variants == {"plain", "aim", "uniform", "permuted", "tuned"}
    assert "TIES (PEFT)" in (tmp_path / "quality.md").read_text()


def test_folded_scoring_loads_base_plus_delta(merged_adapter):
    from mergekit_aim.demo.models import tiny_llama

    model, spec, base, _ = merged_adapter
    plain = tiny_llama(64, hidden_size=32, num_layers=1, seed=5).to(torch.bfloat16)

    class State:
        def blocks(self, scored):
            return {k: v.clone() for k, v in scored.state_dict().items()}, {}

    folded = lora.Folded(model, plain, State())
    deltas = _Deltas(model).blocks(spec.name)[0]
    state = folded.blocks(spec.name)[0]
    for key, delta in deltas.items():
        expected = (base[key] + delta).to(torch.bfloat16)
        torch.testing.assert_close(state[key], expected, rtol=0, atol=0)
    state = folded.blocks(None)[0]
    for key in deltas:
        torch.testing.assert_close(state[key], base[key].to(torch.bfloat16))
