"""Every command that writes refuses, in one line and before writing anything,
a full disk, an unwritable output and bad input; a capped calibration leaves
no offload directory behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.reliability import invoke, leftovers, one_error_line, usage_error
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_aim import output
from mergekit_aim.importance import ImportanceMap


def relax_args(family, importance, out, *options, merged=None):
    return (
        "relax",
        "--base",
        family.base,
        "--merged",
        family.finetunes[0] if merged is None else merged,
        "--importance",
        importance,
        *options,
        "-q",
        out,
    )


def calibrate_args(base, text_file, out, *options):
    return (
        "calibrate",
        base,
        "-o",
        out,
        "--dataset",
        text_file,
        "--num-samples",
        48,
        "--seq-len",
        32,
        "--batch-size",
        4,
        "-q",
        *options,
    )


@pytest.fixture
def small_disk(monkeypatch):
    """A filesystem with 100 kB free, as the free-space probe reports it."""
    monkeypatch.setattr(output, "free_bytes", lambda directory: 100_000)


def test_relax_refuses_a_full_disk(family, artifact, tmp_path, small_disk):
    out = tmp_path / "out"
    line = one_error_line(
        invoke(*relax_args(family, artifact, out)), "not enough space", "100,000 free"
    )
    needed = sum(f.stat().st_size for f in Path(family.finetunes[0]).iterdir())
    assert (
        f"in {tmp_path} " in line
        and int(line.split("needs ")[1].split(" bytes")[0].replace(",", "")) >= needed
    )
    assert os.listdir(tmp_path) == []


def test_calibrate_refuses_a_full_disk(family, tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(output, "free_bytes", lambda directory: 10_000)
    out = tmp_path / "imp.safetensors"
    result = invoke(*calibrate_args(family.base, tiny_text_file, out))
    one_error_line(result, "not enough space", str(out), "10,000 free")
    assert os.listdir(tmp_path) == []


def test_tune_refuses_a_full_disk(family, artifact, tiny_text_file, tmp_path):
    """Before the plain merge: about twice the base model must fit."""
    import yaml

    config = tmp_path / "merge.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(family.base),
                "models": [{"model": str(family.finetunes[0])}],
                "parameters": {"weight": 0.5},
                "dtype": "float32",
                "aim": {"importance": str(artifact)},
            }
        )
    )
    base_bytes = (Path(family.base) / "model.safetensors").stat().st_size
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(output, "free_bytes", lambda directory: base_bytes)
        result = invoke(
            "tune", config, "--eval", f"text={tiny_text_file}", "-q", tmp_path / "out"
        )
    line = one_error_line(result, "not enough space", f"{base_bytes:,} free")
    assert int(line.split("needs ")[1].split(" ")[0].replace(",", "")) > 2 * (
        base_bytes - 100_000
    )
    assert sorted(os.listdir(tmp_path)) == ["merge.yml"]


def test_relax_disk_filling_up_midway(family, artifact, tmp_path, monkeypatch):
    """The probe said yes, then the disk filled: one line, nothing kept."""
    import errno

    from mergekit_aim import offline

    calls = []

    def full_after_some(name, *args, **kwargs):
        calls.append(name)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(offline, "check_finite", full_after_some)
    out = tmp_path / "out"
    one_error_line(invoke(*relax_args(family, artifact, out)), "no space left in")
    assert os.listdir(tmp_path) == []


def test_rerun_over_a_complete_output_overwrites_it(family, artifact, tmp_path):
    out = tmp_path / "out"
    assert invoke(*relax_args(family, artifact, out, "--omega", 0.2)).exit_code == 0
    (out / "notes.txt").write_text("the user's")
    assert invoke(*relax_args(family, artifact, out)).exit_code == 0
    report = json.loads((out / "aim_relax.json").read_text())
    assert report["omega"] == 0.4 and (out / "notes.txt").read_text() == "the user's"
    assert leftovers(tmp_path) == []


def test_capped_calibration_removes_its_offload_directory(
    family, tiny_text_file, tmp_path, monkeypatch
):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    out = tmp_path / "imp.safetensors"
    args = calibrate_args(family.base, tiny_text_file, out, "--max-memory", "200KB")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert out.exists() and not list(temp.glob("mergekit-aim-offload-*"))

    # On an error inside the forward pass too.
    from mergekit_aim.calibration import forward

    def fail(*args, **kwargs):
        assert list(temp.glob("mergekit-aim-offload-*")), "offload dir in use"
        raise KeyboardInterrupt

    monkeypatch.setattr(forward, "collect_importance", fail)
    args = calibrate_args(family.base, tiny_text_file, tmp_path / "b", *args[-2:])
    result = invoke(*args)
    assert result.exit_code == 130 and result.stderr.strip() == "error: interrupted"
    assert not list(temp.glob("mergekit-aim-offload-*"))
    assert sorted(os.listdir(tmp_path)) == ["imp.safetensors", "tmp"]


# --- bad input: one line, nothing written ------------------------------------


def _bad_artifacts(artifact: Path, root: Path) -> dict[str, tuple[Path, str]]:
    data = artifact.read_bytes()
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(data[:8] + b"#" * 16 + data[24:])
    imap = ImportanceMap.load(artifact)
    name = next(n for n in imap if n.endswith("down_proj.weight"))
    narrower = ImportanceMap(
        {n: (imap[n][:-8] if n == name else imap[n]) for n in imap},
        {n: imap.count(n) for n in imap},
        {n: imap.input_axis(n) for n in imap},
        imap.provenance,
    )
    other_width = narrower.save(root / "other-width.safetensors")
    tensors = load_file(artifact)
    with safe_open(str(artifact), framework="pt") as handle:
        metadata = handle.metadata()
    provenance = json.loads(metadata["provenance"])
    provenance["base_fingerprint"] = "0" * 64
    other_base = root / "other-base.safetensors"
    save_file(tensors, other_base, {**metadata, "provenance": json.dumps(provenance)})
    return {
        "truncated": (truncated, "corrupt or truncated"),
        "corrupt": (corrupt, "corrupt or truncated"),
        "other-width": (other_width, f"tensor {name} has"),
        "other-base": (other_base, "recalibrate on this base model"),
    }


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "other-width", "other-base"])
def test_relax_refuses_a_bad_artifact(family, artifact, tmp_path, kind):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path, message = _bad_artifacts(artifact, inputs)[kind]
    out = tmp_path / "out"
    one_error_line(invoke(*relax_args(family, path, out)), str(path), message)
    assert sorted(os.listdir(tmp_path)) == ["inputs"]


def _broken_merge(family, root: Path, name: str, value: float) -> Path:
    merged = root / "merged"
    shutil.copytree(family.finetunes[0], merged)
    tensors = load_file(merged / "model.safetensors")
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] = value
    save_file(tensors, merged / "model.safetensors", {"format": "pt"})
    return merged


@pytest.mark.parametrize(
    "name, value",
    [
        ("model.layers.1.self_attn.q_proj.weight", float("nan")),  # relaxed
        ("model.embed_tokens.weight", float("inf")),  # copied as is
    ],
)
def test_relax_refuses_a_merge_with_nan_or_inf(family, artifact, tmp_path, name, value):
    merged = _broken_merge(family, tmp_path, name, value)
    out = tmp_path / "out"
    result = invoke(*relax_args(family, artifact, out, merged=merged))
    one_error_line(result, f"tensor {name} of {merged}", "NaN or Inf")
    assert os.listdir(tmp_path) == ["merged"]


@pytest.mark.parametrize("omega", ["1.5", "-0.1", "nan"])
def test_relax_refuses_omega_outside_unit_interval(family, artifact, tmp_path, omega):
    result = invoke(*relax_args(family, artifact, tmp_path / "out", "--omega", omega))
    one_error_line(result, "--omega", "within [0, 1]")
    assert os.listdir(tmp_path) == []


def test_unwritable_outputs(family, artifact, tiny_text_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = invoke(*relax_args(family, artifact, blocker / "out"))
    one_error_line(result, f"{blocker} is not a directory")
    result = invoke(*relax_args(family, artifact, blocker))
    usage_error(result, str(blocker), "is a file")
    result = invoke(*calibrate_args(family.base, tiny_text_file, blocker / "imp"))
    one_error_line(result, f"{blocker} is not a directory")
    result = invoke(*calibrate_args(family.base, tiny_text_file, tmp_path))
    usage_error(result, str(tmp_path), "is a directory")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = invoke(*relax_args(family, artifact, locked / "out"))
        one_error_line(result, f"{locked} is not writable")
    assert blocker.read_text() == "x" and leftovers(tmp_path) == []


def _missing_shard(source: Path, root: Path) -> Path:
    model = root / source.name
    shutil.copytree(source, model)
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    index = {
        "metadata": {},
        "weight_map": {
            n: "model-00001-of-00002.safetensors"
            if i % 2
            else "model-00002-of-00002.safetensors"
            for i, n in enumerate(names)
        },
    }
    save_file(
        {n: tensors[n] for n in names[1::2]},
        model / "model-00001-of-00002.safetensors",
        {"format": "pt"},
    )
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


def test_model_directory_missing_shards(family, artifact, tiny_text_file, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    merged = _missing_shard(Path(family.finetunes[0]), inputs)
    result = invoke(*relax_args(family, artifact, tmp_path / "out", merged=merged))
    one_error_line(
        result,
        f"{merged} is missing 1 of the 2 shards",
        "model-00002-of-00002.safetensors",
    )
    base = _missing_shard(Path(family.base), inputs)
    result = invoke(*calibrate_args(base, tiny_text_file, tmp_path / "imp"))
    one_error_line(result, f"{base} is missing 1 of the 2 shards")
    assert sorted(os.listdir(tmp_path)) == ["inputs"]
    assert torch.is_tensor(
        load_file(merged / "model-00001-of-00002.safetensors")[
            sorted(load_file(merged / "model-00001-of-00002.safetensors"))[0]
        ]
    )


def test_demo_stages_its_output_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    # The toy demo writes through a staged directory: a failure midway leaves
    # neither OUT nor a temporary beside it; a run that finishes names OUT (not
    # the temporary) in its reports.
    from mergekit_aim import demo
    from mergekit_aim.demo import toy

    def failing(stage, **kwargs):
        (stage / "models").mkdir()
        raise RuntimeError("training diverged")

    out = tmp_path / "demo-out"
    monkeypatch.setattr(toy, "run_demo", failing)
    with pytest.raises(RuntimeError, match="diverged"):
        demo.main(out, toy=True, quick=True)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    result = demo.main(out, toy=True, quick=True)
    assert result.out_dir == out and all(
        p.parent == out / "models" for p in result.models.values()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-out"]
    report = (out / "results.json").read_text()
    assert output.PARTIAL not in report and str(out) in report


@pytest.mark.parametrize(
    "signum, status, line",
    [(2, 130, "error: interrupted"), (15, 143, "error: terminated (SIGTERM)")],
)
def test_a_signal_that_surfaces_as_another_error_still_reads_as_a_stop(
    family, artifact, tmp_path, monkeypatch, signum, status, line
):
    # A signal arriving inside native code (safetensors reading a tensor) can
    # surface as a ValueError; the command still reports the stop, not a
    # traceback, and leaves nothing behind.
    import signal as signals
    import time

    from mergekit_aim import offline

    def read_interrupted(*args, **kwargs):
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object") from None

    monkeypatch.setattr(offline, "write_relaxed", read_interrupted)
    out = tmp_path / "out"
    result = invoke(*relax_args(family, artifact, out))
    assert result.exit_code == status, (result.output, result.exception)
    assert result.stderr.strip() == line
    assert not out.exists() and leftovers(tmp_path) == []
    assert signals.getsignal(signals.SIGINT) is signals.default_int_handler
