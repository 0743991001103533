"""ImportanceMap: the artifact's format, validation and checks against a base."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from mergekit_aim.checkpoint import read_checkpoint
from mergekit_aim.errors import ImportanceError
from mergekit_aim.importance import (
    FORMAT,
    STATISTIC,
    STATISTICS,
    ImportanceMap,
    load_cached,
)


def _map(**provenance):
    sums = {
        "model.layers.0.mlp.down_proj.weight": torch.tensor([1.0, 2.0, 3.0]),
        "model.layers.1.mlp.down_proj.weight": torch.tensor([4.0, 0.0, 1.0]),
        "model.norm.weight": torch.tensor([0.5, 0.25]),
    }
    counts = {name: 10 for name in sums}
    axes = {name: -1 for name in sums}
    axes["model.norm.weight"] = 0
    return ImportanceMap(sums, counts, axes, provenance)


def _checkpoint(tmp_path, shapes, name="base"):
    directory = tmp_path / name
    directory.mkdir()
    tensors = {k: torch.randn(*shape) for k, shape in shapes.items()}
    save_file(tensors, directory / "model.safetensors")
    return directory, tensors


SHAPES = {
    "model.layers.0.mlp.down_proj.weight": (4, 3),
    "model.layers.1.mlp.down_proj.weight": (4, 3),
    "model.norm.weight": (2,),
    "model.embed_tokens.weight": (5, 2),
}


def test_round_trip_keeps_sums_counts_axes_provenance(tmp_path):
    imap = _map(base_model="org/base", calibration={"seq_len": 512})
    path = imap.save(tmp_path / "imp.safetensors")
    loaded = ImportanceMap.load(path)
    assert set(loaded) == set(imap)
    for name in imap:
        torch.testing.assert_close(loaded[name], imap[name])
        assert loaded.count(name) == 10
        assert loaded.input_axis(name) == imap.input_axis(name)
    torch.testing.assert_close(
        loaded.mean("model.norm.weight"), torch.tensor([0.05, 0.025])
    )
    assert loaded.provenance["base_model"] == "org/base"
    assert loaded.provenance["calibration"] == {"seq_len": 512}
    assert len(loaded.provenance["file_sha256"]) == 64


def test_save_is_atomic_and_leaves_no_temporary(tmp_path):
    _map().save(tmp_path / "imp.safetensors")
    _map().save(tmp_path / "imp.safetensors")
    assert os.listdir(tmp_path) == ["imp.safetensors"]


def test_combine_adds_sums_and_counts():
    both = _map().combine(_map())
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(both[name], torch.tensor([2.0, 4.0, 6.0]))
    assert both.count(name) == 20
    torch.testing.assert_close(both.mean(name), _map().mean(name))


def test_combine_refuses_different_bases():
    with pytest.raises(ImportanceError, match="different base models"):
        _map(base_fingerprint="a").combine(_map(base_fingerprint="b"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ImportanceError, match="not found: .*nope.safetensors"):
        ImportanceMap.load(tmp_path / "nope.safetensors")


def test_truncated_file_is_refused(tmp_path):
    path = _map().save(tmp_path / "imp.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImportanceError, match="corrupt or truncated"):
        ImportanceMap.load(path)


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, path)
    with pytest.raises(ImportanceError, match="not a mergekit-aim importance file"):
        ImportanceMap.load(path)


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.tensor([1.0, -1.0]), "negative or non-finite"),
        (torch.tensor([1.0, float("nan")]), "negative or non-finite"),
        (torch.zeros(2, 2), "1-D float32"),
        (torch.zeros(2, dtype=torch.float16), "1-D float32"),
    ],
)
def test_bad_vectors_name_the_tensor(tmp_path, tensor, message):
    path = tmp_path / "imp.safetensors"
    metadata = {
        "format": FORMAT,
        "format_version": "1",
        "statistic": STATISTIC,
        "counts": json.dumps({"x.weight": 3}),
        "input_axes": json.dumps({"x.weight": -1}),
    }
    save_file({"x.weight": tensor}, path, metadata=metadata)
    with pytest.raises(ImportanceError, match=f"x.weight.*{message}|{message}"):
        ImportanceMap.load(path)


def _rewrite_metadata(path, **changes):
    """Re-save ``path`` with header metadata keys changed (None: removed)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(tensors, str(path), metadata=metadata)


def test_saved_artifacts_name_the_statistic_older_versions_wrote(tmp_path):
    # Artifacts written before the statistic was checked carry this name:
    # they must stay loadable.
    assert STATISTIC == "sum_abs_input_per_channel" and STATISTIC in STATISTICS
    path = _map().save(tmp_path / "imp.safetensors")
    _rewrite_metadata(path, statistic="sum_abs_input_per_channel")
    loaded = ImportanceMap.load(path)
    assert loaded.statistic == STATISTIC
    assert loaded.save(tmp_path / "again.safetensors")
    assert ImportanceMap.load(tmp_path / "again.safetensors").statistic == STATISTIC


@pytest.mark.parametrize("statistic", ["sum_sq_input_per_channel", "", None])
def test_unknown_statistic_is_refused(tmp_path, statistic):
    path = _map().save(tmp_path / "imp.safetensors")
    _rewrite_metadata(path, statistic=statistic)
    with pytest.raises(ImportanceError) as error:
        ImportanceMap.load(path)
    message = str(error.value)
    assert str(path) in message
    assert repr(statistic) in message
    assert "sum_abs_input_per_channel" in message


def test_maps_of_unknown_statistics_cannot_be_built():
    with pytest.raises(ImportanceError, match="unknown statistic 'other'"):
        ImportanceMap({}, {}, {}, statistic="other")


def test_check_against_accepts_its_base(tmp_path):
    directory, _ = _checkpoint(tmp_path, SHAPES)
    checkpoint = read_checkpoint(directory)
    _map(base_fingerprint=checkpoint.fingerprint).check_against(checkpoint)


def test_check_against_refuses_unknown_tensor(tmp_path):
    shapes = {k: v for k, v in SHAPES.items() if k != "model.norm.weight"}
    directory, _ = _checkpoint(tmp_path, shapes)
    with pytest.raises(ImportanceError, match="model.norm.weight.*another model"):
        _map().check_against(read_checkpoint(directory))


def test_check_against_refuses_wrong_length(tmp_path):
    shapes = dict(SHAPES)
    shapes["model.layers.1.mlp.down_proj.weight"] = (4, 7)
    directory, _ = _checkpoint(tmp_path, shapes)
    with pytest.raises(
        ImportanceError, match=r"model.layers.1.mlp.down_proj.weight has 3 channels"
    ):
        _map().check_against(read_checkpoint(directory))


def test_check_against_refuses_missing_layer(tmp_path):
    shapes = dict(SHAPES)
    shapes["model.layers.2.mlp.down_proj.weight"] = (4, 3)
    directory, _ = _checkpoint(tmp_path, shapes)
    with pytest.raises(
        ImportanceError, match="no statistic for base tensor .*layers.2"
    ):
        _map().check_against(read_checkpoint(directory))


def test_check_against_refuses_fingerprint_mismatch(tmp_path):
    directory, _ = _checkpoint(tmp_path, SHAPES)
    checkpoint = read_checkpoint(directory)
    with pytest.raises(ImportanceError, match="fingerprint"):
        _map(base_fingerprint="0" * 64).check_against(checkpoint)


def test_fingerprint_sees_changed_weights(tmp_path):
    first, tensors = _checkpoint(tmp_path, SHAPES, "first")
    second = tmp_path / "second"
    second.mkdir()
    tensors = dict(tensors)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, second / "model.safetensors")
    assert read_checkpoint(first).fingerprint != read_checkpoint(second).fingerprint
    assert read_checkpoint(first).shape("model.norm.weight") == (2,)


def test_load_cached_reads_once_per_file_version(tmp_path):
    path = _map().save(tmp_path / "imp.safetensors")
    assert load_cached(str(path)) is load_cached(str(path))


def _populate_hub_cache(cache, repo, filename, source):
    """Lay a file out the way huggingface_hub's cache stores a download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    (snapshot / filename).write_bytes(source.read_bytes())


@pytest.mark.parametrize(
    "spec, filename",
    [
        ("org/base", "aim_importance.safetensors"),
        ("org/base:custom.safetensors", "custom.safetensors"),
    ],
)
def test_hub_artifacts_resolve_from_the_cache_offline(tmp_path, spec, filename):
    from mergekit_aim.importance import resolve_artifact

    source = _map(base_model="org/base").save(tmp_path / "local.safetensors")
    cache = tmp_path / "hub"
    _populate_hub_cache(cache, "org/base", filename, source)
    path = resolve_artifact(spec, cache_dir=str(cache))
    assert path.endswith(filename)
    assert ImportanceMap.load(path).provenance["base_model"] == "org/base"


def test_unreachable_hub_artifact_is_named(tmp_path):
    from mergekit_aim.importance import resolve_artifact

    with pytest.raises(ImportanceError, match="org/missing.*local path"):
        resolve_artifact("org/missing", cache_dir=str(tmp_path))


def test_nonsense_artifact_spec_is_refused():
    from mergekit_aim.importance import resolve_artifact

    with pytest.raises(ImportanceError, match="not a Hub repository id"):
        resolve_artifact("no such file.safetensors")


def test_on_device_uploads_every_vector_once():
    sums = {"a.weight": torch.arange(3.0), "b.weight": torch.arange(5.0)}
    imap = ImportanceMap(sums, {"a.weight": 2, "b.weight": 2}, dict.fromkeys(sums, -1))
    assert imap.on_device("a.weight", torch.device("cpu")) is imap["a.weight"]
    meta = torch.device("meta")
    first = imap.on_device("b.weight", meta)
    assert first.device == meta and first.shape == (5,)
    assert imap.on_device("a.weight", meta).shape == (3,)
    assert imap.on_device("b.weight", meta) is first  # cached: one transfer
