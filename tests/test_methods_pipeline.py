"""Every base-aware method through mergekit's real pipeline (config -> planner ->
graph -> writer), in process: the AIM output equals the formula applied to the
plain output of the same config and seed."""

import pytest
import torch
import yaml
from fixtures.checkpoint_files import load_dir
from fixtures.reference import aim_expected
from test_method import METHODS, PAIRWISE

from mergekit_aim.calibration import collect_importance
from mergekit_aim.checkpoint import read_checkpoint

PARAMETERS = {"weight": 0.6, "density": 0.7, "t": 0.3}


@pytest.fixture(scope="module")
def artifact(tiny_family, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    family = tiny_family("llama")
    model = AutoModelForCausalLM.from_pretrained(family.base)
    checkpoint = read_checkpoint(family.base)
    blocks = torch.randint(3, model.config.vocab_size, (4, 16))
    imap = collect_importance(model, blocks, checkpoint_names=set(checkpoint.tensors))
    imap.provenance["base_fingerprint"] = checkpoint.fingerprint
    return imap.save(tmp_path_factory.mktemp("methods") / "imp.safetensors")


def _merge(config, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(config),
        str(out),
        MergeOptions(random_seed=3, quiet=True, copy_tokenizer=False),
        config_source=yaml.safe_dump(config),
    )
    return load_dir(out)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_through_the_pipeline(name, tiny_family, artifact, tmp_path):
    from mergekit import merge_methods

    from mergekit_aim.importance import ImportanceMap

    family = tiny_family("llama")
    spec = merge_methods.get(name).spec
    finetunes = family.finetunes[:1] if name in PAIRWISE else family.finetunes
    params = {
        p.name: PARAMETERS[p.name] for p in spec.parameters if p.name in PARAMETERS
    }
    per_model = {k: v for k, v in params.items() if k in ("weight", "density")}
    shared = {k: v for k, v in params.items() if k not in per_model}
    models = [{"model": str(m), "parameters": per_model} for m in finetunes]
    if name in ("linear", "karcher"):  # base-ignoring methods merge the base too
        models.append({"model": str(family.base), "parameters": per_model})
    config = {
        "merge_method": name,
        "base_model": str(family.base),
        "models": models,
        "parameters": shared,
        "dtype": "float32",
    }
    plain = _merge(config, tmp_path / "plain")
    relaxed = _merge(
        {**config, "aim": {"omega": 0.25, "importance": str(artifact)}},
        tmp_path / "aim",
    )
    base = load_dir(family.base)
    imap = ImportanceMap.load(artifact)
    relaxed_count = 0
    for key, merged in plain.items():
        if key in imap:
            expected = aim_expected(
                base[key], merged, imap[key], 0.25, imap.input_axis(key)
            )
            torch.testing.assert_close(relaxed[key], expected, rtol=1e-5, atol=1e-6)
            relaxed_count += 1
        else:
            torch.testing.assert_close(relaxed[key], merged, rtol=0, atol=0)
    assert relaxed_count == len(imap)
