"""selection.py: the one rule for which tensors are relaxed and with which ω,
shared by planning, post-hoc relax and tune."""

import pytest
import torch
from fixtures.reference import aim_reference

from mergekit_aim.calibration.data import read_txt_documents
from mergekit_aim.errors import AimConfigError, CalibrationDataError, TextFileError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.offline import apply_aim
from mergekit_aim.relaxation import Coverage
from mergekit_aim.selection import (
    EXCLUDED,
    NO_OMEGA,
    NO_STATISTIC,
    OMEGA_ONE,
    RELAXED,
    Selection,
    is_mlp,
    layer_positions,
    setting_json,
    split_omega,
)
from mergekit_aim.tuning import candidate_tensors
from mergekit_aim.tuning.evaluation import read_eval_texts

MLP = "model.layers.1.mlp.down_proj.weight"
ATTN = "model.layers.1.self_attn.q_proj.weight"


def test_reasons_in_order():
    selection = Selection(
        [{"filter": "self_attn", "value": 1.0}, {"filter": "mlp", "value": 0.3}],
        exclude=["layers\\.0\\."],
    )
    assert selection.decide("model.layers.0.mlp.x", "k").reason == EXCLUDED
    # exclude is tried on the statistic's key too (a moved layer in slices:)
    assert selection.decide(MLP, "model.layers.0.mlp.x").reason == EXCLUDED
    assert selection.decide(MLP, None).reason == NO_STATISTIC
    assert selection.decide(ATTN, ATTN).reason == OMEGA_ONE
    assert selection.decide("model.norm.weight", "n").reason == NO_OMEGA
    decision = selection.decide(MLP, MLP)
    assert decision.reason == RELAXED and decision.omega == pytest.approx(0.3)


def test_gradient_is_read_at_the_layer_position():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)]
    positions = layer_positions([*names, "lm_head.weight"])
    assert [positions[n] for n in names] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert positions["lm_head.weight"] == 0.0
    selection = Selection([0.0, 0.8])
    omegas = [selection.decide(n, n, positions[n]).omega for n in names]
    assert omegas == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    to_plain = Selection([0.0, 1.0])
    assert to_plain.decide(names[-1], names[-1], 1.0).reason == OMEGA_ONE


def test_split_omega_is_an_ordinary_filtered_setting():
    assert split_omega(0.4, 0.4) == 0.4
    setting = split_omega(0.6, 0.2)
    selection = Selection(setting_json(setting))  # plain JSON round-trips
    assert selection.decide(MLP, MLP).omega == pytest.approx(0.2)
    assert selection.decide(ATTN, ATTN).omega == pytest.approx(0.6)
    assert is_mlp(MLP) and not is_mlp(ATTN)
    assert is_mlp("model.layers.0.block_sparse_moe.experts.0.w1.weight")


@pytest.mark.parametrize(
    "omega, exclude, match",
    [
        (1.5, (), "within \\[0, 1\\]"),
        ([], (), "empty list"),
        ([{"filter": "mlp", "value": -0.1}], (), "within \\[0, 1\\]"),
        (0.4, ["("], "not a valid regular expression"),
        (0.4, "lm_head", "list of patterns"),
    ],
)
def test_bad_settings_name_what_is_wrong(omega, exclude, match):
    with pytest.raises(AimConfigError, match=match):
        Selection(omega, exclude)


def test_coverage_counts_reasons_and_omega_range():
    coverage = Coverage()
    selection = Selection([{"filter": "mlp", "value": 0.2}, {"value": 0.5}])
    for name, key in ((MLP, MLP), (ATTN, ATTN), ("x.bias", None)):
        coverage.add(name, selection.decide(name, key))
    summary = coverage.summary()
    assert summary["tensors"] == 3 and summary["relaxed"] == 2
    assert summary["left_alone"] == {NO_STATISTIC: 1}
    assert (summary["omega_min"], summary["omega_max"]) == (0.2, 0.5)


def _pair(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    names = [MLP, ATTN, "model.layers.0.mlp.up_proj.weight"]
    base = {n: torch.randn(4, 6, generator=gen) for n in names}
    merged = {n: base[n] + torch.randn(4, 6, generator=gen) for n in names}
    stats = {n: torch.rand(6, generator=gen) * 10 for n in names}
    imap = ImportanceMap(stats, {n: 8 for n in names}, {n: -1 for n in names})
    return base, merged, imap


def test_tune_candidate_equals_its_setting_applied_post_hoc():
    """What tune scores for a split pair is exactly what its printed aim:
    setting relaxes, so pasting it into a config reproduces the pick."""
    base, merged, imap = _pair()
    candidate = candidate_tensors(base, merged, imap, 0.6, 0.2)
    applied = apply_aim(base, merged, imap, setting_json(split_omega(0.6, 0.2)))
    for name in merged:
        assert torch.equal(candidate[name], applied[name]), name
    expected = aim_reference(base[ATTN], merged[ATTN], imap[ATTN], 0.6)
    torch.testing.assert_close(applied[ATTN], expected.to(torch.float32))


def test_apply_aim_follows_exclude_and_gradient():
    base, merged, imap = _pair(1)
    out = apply_aim(base, merged, imap, [0.0, 0.5], exclude=["up_proj"])
    assert torch.equal(
        out["model.layers.0.mlp.up_proj.weight"],
        merged["model.layers.0.mlp.up_proj.weight"],
    )
    # layer 1 of 2 sits at t = 1: ω = 0.5
    expected = aim_reference(base[MLP], merged[MLP], imap[MLP], 0.5)
    torch.testing.assert_close(out[MLP], expected.to(torch.float32))


def test_one_text_reader_for_calibration_and_eval_files(tmp_path):
    good = tmp_path / "docs.txt"
    good.write_text("first\nline\n\n\nsecond\n", encoding="utf-8")
    assert read_txt_documents(good, "calibration file") == ["first\nline", "second"]
    assert read_eval_texts(good) == ["first\nline", "second"]
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"caf\xe9\n")
    for call, role in (
        (lambda: read_txt_documents(bad, "calibration file"), "calibration file"),
        (lambda: read_eval_texts(bad), "eval file"),
    ):
        with pytest.raises(TextFileError, match=f"{role} .* not UTF-8") as info:
            call()
        assert isinstance(info.value, AimConfigError)
        assert isinstance(info.value, CalibrationDataError)
