"""`mergekit-aim tune`: candidates are relax(plain merge, ω), the pick is the
lowest objective, ω = 1 is the plain merge exactly, bad input writes nothing."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from fixtures.checkpoint_files import load_dir

from mergekit_aim.errors import AimConfigError, AimError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.offline import apply_aim, relax_checkpoint
from mergekit_aim.tuning import (
    TuneResult,
    candidate_tensors,
    omega_grid,
    tune,
    tune_merged,
)
from mergekit_aim.tuning import search as tune_module
from mergekit_aim.tuning.evaluation import evaluate_loss, read_eval_texts, token_windows

CLI = str(Path(sys.executable).with_name("mergekit-aim"))
SEQ_LEN, BATCH = 32, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices gain nothing from a second thread, and on busy cores
    # OpenMP threads spin-waiting on each other make each forward ~50x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def family(tiny_family):
    return tiny_family("llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_text):
    from benchmarks.synthetic import generate_sentences

    root = tmp_path_factory.mktemp("tune-data")
    (root / "calibration.txt").write_text("\n\n".join(tiny_text))
    stories = generate_sentences(24, seed=11)
    (root / "stories.txt").write_text(
        "\n\n".join(" ".join(stories[i : i + 3]) for i in range(0, 24, 3))
    )
    rows = [{"text": s, "id": i} for i, s in enumerate(generate_sentences(16, seed=12))]
    (root / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.fixture(scope="module")
def artifact(family, data):
    from mergekit_aim import calibrate

    imap = calibrate(
        str(family.base),
        dataset=str(data / "calibration.txt"),
        num_samples=32,
        seq_len=32,
        batch_size=4,
        quiet=True,
    )
    return imap.save(data / "importance.safetensors")


def merge_config(family, aim=None):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(family.base),
        "models": [
            {"model": str(m), "parameters": {"weight": 0.6}} for m in family.finetunes
        ],
        "dtype": "float32",
    }
    if aim is not None:
        config["aim"] = aim
    return config


@pytest.fixture(scope="module")
def plain(family, tmp_path_factory):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = tmp_path_factory.mktemp("tune-plain") / "plain"
    config = MergeConfiguration.model_validate(merge_config(family))
    run_merge(config, str(out), options=MergeOptions(copy_tokenizer=True, quiet=True))
    return out


@pytest.fixture(scope="module")
def evals(data):
    return {
        "stories": read_eval_texts(data / "stories.txt"),
        "lines": read_eval_texts(data / "lines.jsonl"),
    }


@pytest.fixture(scope="module")
def result(family, plain, artifact, evals):
    return tune_merged(
        family.base,
        plain,
        artifact,
        evals,
        omegas=(0.5, 0.0),
        seq_len=SEQ_LEN,
        batch_size=BATCH,
    )


# --- the table ---------------------------------------------------------------


def test_grid_adds_plain_and_the_pick_has_the_lowest_objective(result):
    assert [r.omega for r in result.rows] == [0.0, 0.5, 1.0]
    assert all(r.omega_mlp == r.omega_attention for r in result.rows)
    assert min(r.objective for r in result.rows) == result.chosen.objective
    assert result.chosen in result.rows
    plain_row = result.rows[-1]
    assert plain_row.is_plain and result.chosen.objective <= plain_row.objective
    for row in result.rows:
        changes = [
            (row.losses[n] - result.base_losses[n]) / result.base_losses[n]
            for n in ("stories", "lines")
        ]
        assert row.objective == pytest.approx(sum(changes) / 2)
    # The relaxed candidates really differ from the plain merge.
    assert len({r.losses["stories"] for r in result.rows}) == 3


def test_plain_row_is_the_plain_merge_exactly(result, family, plain, evals):
    for name, texts in evals.items():
        kwargs = dict(seq_len=SEQ_LEN, batch_size=BATCH)
        assert result.rows[-1].losses[name] == evaluate_loss(plain, texts, **kwargs)
        assert result.base_losses[name] == evaluate_loss(family.base, texts, **kwargs)


def test_a_row_is_relax_of_the_plain_merge(result, family, plain, artifact, evals):
    imap = ImportanceMap.load(artifact)
    base_sd, plain_sd = load_dir(family.base), load_dir(plain)
    relaxable = {n: t for n, t in plain_sd.items() if n in imap}
    expected = apply_aim(base_sd, plain_sd, imap, 0.5)
    got = candidate_tensors(base_sd, relaxable, imap, 0.5)
    assert set(got) == set(relaxable)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name
    assert sum(not torch.equal(got[n], plain_sd[n]) for n in got) > 0
    # The in-memory candidate scores exactly like `mergekit-aim relax`'s output.
    out = Path(str(plain) + "-relaxed-0.5")
    relax_checkpoint(family.base, plain, imap, 0.5, out)
    row = next(r for r in result.rows if r.omega == 0.5)
    for name, texts in evals.items():
        loss = evaluate_loss(out, texts, seq_len=SEQ_LEN, batch_size=BATCH)
        assert row.losses[name] == loss


def test_split_grid_has_pairs(result, family, plain, artifact, evals):
    split = tune_merged(
        family.base,
        plain,
        artifact,
        evals,
        omegas=(0.5,),
        split_attention_mlp=True,
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        base_losses=result.base_losses,
    )
    assert [r.omega for r in split.rows] == [(0.5, 0.5), (0.5, 1.0), (1.0, 0.5)] + [
        (1.0, 1.0)
    ]
    assert split.base_losses == result.base_losses
    same = next(r for r in result.rows if r.omega == 0.5)
    assert split.rows[0].losses == same.losses
    assert split.rows[-1].losses == result.rows[-1].losses
    assert split.chosen.objective == min(r.objective for r in split.rows)
    table = split.to_markdown()
    assert "ω (other / MLP)" in table and "| 0.5 / 1 |" in table
    assert json.loads(json.dumps(split.to_json()))["split_attention_mlp"] is True


def test_split_candidate_relaxes_each_group_with_its_omega(family, plain, artifact):
    imap = ImportanceMap.load(artifact)
    base_sd, plain_sd = load_dir(family.base), load_dir(plain)
    relaxable = {n: t for n, t in plain_sd.items() if n in imap}
    got = candidate_tensors(base_sd, relaxable, imap, 1.0, 0.2)
    mlp = "model.layers.0.mlp.down_proj.weight"
    attention = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got[attention], plain_sd[attention])
    assert torch.equal(got["model.norm.weight"], plain_sd["model.norm.weight"])
    assert torch.equal(got[mlp], apply_aim(base_sd, plain_sd, imap, 0.2)[mlp])
    assert not torch.equal(got[mlp], plain_sd[mlp])


def test_markdown_and_json(result):
    lines = result.to_markdown().splitlines()
    assert lines[0] == "| ω | stories | lines | objective |  |"
    assert lines[2].startswith("| base |")
    assert len(lines) == 3 + len(result.rows)
    assert "(plain)" in lines[-1]
    assert sum("**chosen**" in line for line in lines) == 1
    saved = json.loads(json.dumps(result.to_json()))
    assert saved["chosen"] == result.chosen.to_json()
    assert [r["omega_attention"] for r in saved["rows"]] == [0.0, 0.5, 1.0]
    assert isinstance(result, TuneResult)


# --- evaluation ----------------------------------------------------------------


def test_evaluate_loss_matches_the_models_own_loss(family, plain):
    from transformers import AutoModelForCausalLM

    tokenizer = family.tokenizer
    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    texts = ["The farmer found a map.", "A small child opened the green door again."]
    ids = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    with torch.no_grad():
        sums = [
            model(input_ids=i[None], labels=i[None]).loss * (len(i) - 1) for i in ids
        ]
    expected = float(sum(sums)) / sum(len(i) - 1 for i in ids)
    got = evaluate_loss(model, texts, tokenizer=tokenizer, seq_len=64, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got == evaluate_loss(model, texts, tokenizer=tokenizer, seq_len=64)


def test_window_nll_is_per_window_in_input_order(family, plain):
    from transformers import AutoModelForCausalLM

    from mergekit_aim.tuning.evaluation import pad_token_id, sum_nll, window_nll

    tokenizer = family.tokenizer
    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    texts = ["A small child opened the green door again.", "The map.", "Yes, it did."]
    windows = [tokenizer(t)["input_ids"] for t in texts]
    pad = pad_token_id(tokenizer)
    got = window_nll(model, windows, 2, pad)
    with torch.no_grad():
        for (total, count), ids in zip(got, windows, strict=True):
            ids = torch.tensor(ids)[None]
            assert count == ids.shape[1] - 1
            own = float(model(input_ids=ids, labels=ids).loss) * count
            assert total == pytest.approx(own, rel=1e-5)
    total, count = sum_nll(model, windows, 2, pad)
    assert count == sum(c for _, c in got)
    assert total == pytest.approx(sum(t for t, _ in got), rel=1e-6)


def test_windows_predict_every_token_once(family):
    texts = ["The farmer found a map near the market and smiled. " * 6, "Again."]
    windows = token_windows(family.tokenizer, texts, 8)
    assert max(len(w) for w in windows) == 8
    lengths = [len(family.tokenizer(t)["input_ids"]) for t in texts]
    assert sum(len(w) - 1 for w in windows) == sum(n - 1 for n in lengths)
    with pytest.raises(AimConfigError, match="no token"):
        token_windows(family.tokenizer, [""], 8)


def test_eval_files(tmp_path, data):
    assert len(read_eval_texts(data / "stories.txt")) == 8
    assert len(read_eval_texts(data / "lines.jsonl")) == 16
    cases = {
        "missing.txt": (None, "does not exist"),
        "bad.csv": ("a,b\n", "expected a .txt or .jsonl"),
        "empty.txt": ("\n\n  \n", "holds no text"),
        "broken.jsonl": ('{"text": "a"}\n{oops\n', "line 2: not JSON"),
        "field.jsonl": ('{"body": "a"}\n', "line 1: expected an object with a"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_text(content)
        with pytest.raises(AimConfigError, match=message):
            read_eval_texts(tmp_path / name)


def test_omega_grid():
    assert omega_grid([0.4, 0, 0.4]) == [(0.0, 0.0), (0.4, 0.4), (1.0, 1.0)]
    assert omega_grid([1]) == [(1.0, 1.0)]
    assert omega_grid([0.5], split_attention_mlp=True) == [
        (0.5, 0.5),
        (0.5, 1.0),
        (1.0, 0.5),
        (1.0, 1.0),
    ]
    with pytest.raises(AimConfigError, match="within"):
        omega_grid([0.2, 1.5])


# --- the command -----------------------------------------------------------------


def test_tune_writes_the_chosen_candidate(
    family, plain, artifact, data, tmp_path, monkeypatch
):
    """The written model is the chosen in-memory candidate, bit for bit (here a
    split pick, forced, so both relaxation passes run)."""
    real_choose = tune_module.choose
    picked = []

    def choose(rows, choice):
        real_choose(rows, choice)
        picked.append(next(r for r in rows if r.omega == (0.2, 0.5)))
        return picked[-1]

    monkeypatch.setattr(tune_module, "choose", choose)
    config = tmp_path / "merge.yml"
    aim = {"omega": 0.9, "importance": str(artifact), "exclude": ["^lm_head\\."]}
    config.write_text(yaml.safe_dump(merge_config(family, aim)))
    out = tmp_path / "tuned"
    result = tune(
        config,
        {"stories": data / "stories.txt"},
        out,
        omegas=[0.2, 0.5],
        split_attention_mlp=True,
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        quiet=True,
    )
    assert len(result.rows) == 9 and result.chosen is picked[-1]
    imap = ImportanceMap.load(artifact)
    base_sd, plain_sd = load_dir(family.base), load_dir(plain)
    relaxable = {
        n: t for n, t in plain_sd.items() if n in imap and n != "lm_head.weight"
    }
    expected = {**plain_sd, **candidate_tensors(base_sd, relaxable, imap, 0.2, 0.5)}
    written = load_dir(out)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    assert torch.equal(written["lm_head.weight"], plain_sd["lm_head.weight"])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    card = (out / "README.md").read_text()
    assert "- aim" in card and "0.2 (attention, norms, LM head)" in card
    report = json.loads((out / "aim_tune.json").read_text())
    assert report["chosen"]["omega_attention"] == 0.2
    assert report["chosen"]["omega_mlp"] == 0.5
    assert report["importance"]["artifact"] == str(artifact)
    assert not (out / "aim_relax.json").exists()


def run_cli(*args):
    return subprocess.run(
        [CLI, *map(str, args)],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        },
    )


@pytest.mark.slow
def test_cli_end_to_end(family, artifact, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(merge_config(family)))
    out = tmp_path / "tuned"
    result = run_cli(
        "tune",
        config,
        "--importance",
        artifact,
        "--eval",
        f"stories={data / 'stories.txt'}",
        "--eval",
        f"lines={data / 'lines.jsonl'}",
        "--omega",
        "0.3",
        "--seq-len",
        SEQ_LEN,
        "--quiet",
        out,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| ω | stories | lines | objective |  |" in result.stdout
    report = json.loads((out / "aim_tune.json").read_text())
    assert [r["omega_attention"] for r in report["rows"]] == [0.3, 1.0]
    chosen = report["chosen"]
    assert chosen["objective"] == min(r["objective"] for r in report["rows"])
    assert "**chosen**" in (out / "aim_tune.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    loss = evaluate_loss(
        model, read_eval_texts(data / "lines.jsonl"), tokenizer=tokenizer, seq_len=32
    )
    assert loss == pytest.approx(chosen["losses"]["lines"], rel=1e-6)
    card = (out / "README.md").read_text()
    assert "mergekit-aim tune" in card and f"ω = {chosen['omega_attention']:g}" in card


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eval", "stories=nowhere.txt"], "nowhere.txt' does not exist"),
        (["--eval", "stories"], "expected NAME=FILE"),
        (["--eval", "=x.txt"], "expected NAME=FILE"),
        (["--eval", "STORIES", "--omega", "0.2,1.5"], "--omega: omega must be within"),
        (["--eval", "STORIES", "--omega", "0.2,,1"], "comma-separated"),
        (["--eval", "STORIES", "--eval", "STORIES"], "given twice"),
        (["--eval", "STORIES", "--seq-len", "1"], "--seq-len"),
        (["--eval", "STORIES"], "has no aim: block"),
    ],
)
def test_bad_input_fails_before_writing(args, message, family, data, tmp_path):
    from mergekit_aim.cli import main

    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(merge_config(family)))
    out = tmp_path / "never"
    args = [a.replace("STORIES", f"stories={data / 'stories.txt'}") for a in args]
    result = CliRunner().invoke(main, ["tune", str(config), *args, str(out)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
    assert not out.exists()


def test_api_refuses_bad_input_before_writing(family, artifact, data, tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(merge_config(family, {"importance": "x.st"})))
    out = tmp_path / "never"
    stories = {"stories": data / "stories.txt"}
    with pytest.raises(AimError, match="x.st"):
        tune(config, stories, out, importance=None)
    with pytest.raises(AimConfigError, match="does not exist"):
        tune(tmp_path / "missing.yml", stories, out, importance=str(artifact))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(AimConfigError, match="not empty"):
        tune(config, stories, busy, importance=str(artifact))
    assert not out.exists() and os.listdir(busy) == ["keep.txt"]


def test_tune_calibrates_through_the_cache(family, plain, data, tmp_path):
    config = tmp_path / "merge.yml"
    calibration = {"dataset": str(data / "calibration.txt"), "seq_len": 32}
    aim = {"omega": 0.4, "calibration": {**calibration, "num_samples": 32}}
    config.write_text(yaml.safe_dump(merge_config(family, aim)))
    out = tmp_path / "tuned"
    result = tune(
        config,
        {"lines": data / "lines.jsonl"},
        out,
        omegas=[0.5],
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        quiet=True,
    )
    report = json.loads((out / "aim_tune.json").read_text())
    artifact = Path(report["importance"]["artifact"])
    assert artifact.parent == Path(os.environ["MERGEKIT_AIM_CACHE"])
    assert report["importance"]["source"].startswith("calibrated on")
    imap = ImportanceMap.load(artifact)
    base_sd, plain_sd = load_dir(family.base), load_dir(plain)
    relaxable = {n: t for n, t in plain_sd.items() if n in imap}
    chosen = result.chosen.omega
    expected = {**plain_sd, **candidate_tensors(base_sd, relaxable, imap, chosen)}
    written = load_dir(out)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name


# --- the choice: skill floors, then the objective ------------------------------


def _row(omega, **values):
    from mergekit_aim.tuning.evaluation import Score
    from mergekit_aim.tuning.search import TuneRow

    scores = {
        name: Score(name, value, stderr, higher)
        for name, (value, stderr, higher) in values.items()
    }
    return TuneRow(
        omega,
        omega,
        {},
        scores["obj"].value,
        scores=scores,
        objective_score=scores["obj"],
    )


def test_choice_keeps_skills_then_takes_the_best_objective():
    from mergekit_aim.tuning.search import Choice, choose, within_stderr

    rows = [
        _row(0.0, obj=(0.90, 0.01, True), math=(0.30, 0.05, True)),
        _row(0.4, obj=(0.80, 0.01, True), math=(0.48, 0.05, True)),
        _row(0.8, obj=(0.80, 0.01, True), math=(0.50, 0.05, True)),
        _row(1.0, obj=(0.70, 0.01, True), math=(0.50, 0.05, True)),
    ]
    # No floor: the best objective.
    assert choose(rows, Choice("obj")).omega == 0.0
    # math may fall 0.05 below plain: ω = 0 (−0.20) is out; 0.4 and 0.8 tie on
    # the objective and the larger ω wins.
    chosen = choose(rows, Choice("obj", {"math": 0.05}))
    assert chosen.omega == 0.8 and not rows[1].excluded_by
    assert rows[0].excluded_by == ["math"] and not rows[0].eligible
    # A floor nobody but plain meets: the plain merge, always eligible.
    assert choose(rows, Choice("obj", {"math": 0.0})).omega in (0.8, 1.0)
    rows[2].scores["math"] = replace(rows[2].scores["math"], value=math.nan)
    assert choose(rows, Choice("obj", {"math": 0.0})).is_plain
    assert rows[2].excluded_by == ["math"]  # not a number: not eligible
    # A lead of 0.2 against a combined stderr of 0.014: real; against 0.3: not.
    assert within_stderr(rows[0], rows[3]) is False
    rows[0].objective_score = replace(rows[0].objective_score, stderr=0.3)
    assert within_stderr(rows[0], rows[3]) is True
    rows[0].objective_score = replace(rows[0].objective_score, stderr=None)
    assert within_stderr(rows[0], rows[3]) is None


def test_choice_is_direction_aware_for_losses():
    from mergekit_aim.tuning.search import Choice, choose

    rows = [
        _row(0.0, obj=(2.0, 0.01, False), code=(3.5, 0.01, False)),
        _row(0.5, obj=(2.1, 0.01, False), code=(3.05, 0.01, False)),
        _row(1.0, obj=(2.5, 0.01, False), code=(3.0, 0.01, False)),
    ]
    assert choose(rows, Choice("obj")).omega == 0.0
    assert choose(rows, Choice("obj", {"code": 0.1})).omega == 0.5
    assert rows[0].excluded_by == ["code"]


def test_choice_settings_are_resolved_or_refused():
    from mergekit_aim.tuning.search import parse_keep, resolve_choice

    metrics = {
        "code": False,
        "arith/exact_match": True,
        "mc/acc": True,
        "mc/acc_norm": True,
    }
    choice = resolve_choice(metrics, ["code"], None, {"arith": 0.02})
    assert choice.objective == "loss" and choice.keep == {"arith/exact_match": 0.02}
    only = resolve_choice({"arith/exact_match": True}, [])
    assert only.objective == "arith/exact_match"
    refusals = [
        (dict(loss_sets=[]), "--objective: name the metric"),
        (dict(loss_sets=[], objective="loss"), "needs at least one --eval"),
        (dict(loss_sets=["code"], objective="mc"), "several metrics"),
        (dict(loss_sets=["code"], keep={"nope": 0}), "--keep 'nope': not a metric"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(AimConfigError, match=message):
            resolve_choice(metrics, **kwargs)
    assert parse_keep(["mc/acc=0.05", "code"]) == {"mc/acc": 0.05, "code": 0.0}
    for bad in (["x=-1"], ["x=a"], ["=1"], ["x", "x=1"]):
        with pytest.raises(AimConfigError, match="--keep"):
            parse_keep(bad)


def test_loss_stderr_is_the_clustered_error():
    from mergekit_aim.tuning.evaluation import clustered_mean

    mean, stderr = clustered_mean([(2.0, 1), (4.0, 1)])
    assert mean == 3.0 and stderr == pytest.approx(1.0)
    assert clustered_mean([(6.0, 3)]) == (2.0, 0.0)
    # Token-weighted: a long window counts for its tokens.
    assert clustered_mean([(2.0, 1), (12.0, 3)])[0] == pytest.approx(3.5)


# --- lm-evaluation-harness ---------------------------------------------------------


def write_tasks(root: Path) -> Path:
    """Two local lm-eval tasks over generated items: arithmetic answered by
    greedy generation (exact match) and a 3-way choice (accuracy)."""
    import random

    rng = random.Random(5)
    arith = []
    for _ in range(12):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        arith.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    words = ["farmer", "map", "door", "market", "child", "river"]
    choice = [
        {
            "context": f"The {w} found a",
            "choices": [" map", " door", " cat"],
            "label": i % 3,
        }
        for i, w in enumerate(words * 2)
    ]
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("arith", arith), ("choice", choice)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "arith.yaml").write_text(
        f"task: tiny_arith\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'arith.jsonl'}\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{question}} Answer:"\n'
        'doc_to_target: " {{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 3\n'
        "  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    (root / "choice.yaml").write_text(
        f"task: tiny_choice\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'choice.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return root


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory):
    pytest.importorskip("lm_eval")
    return write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


@pytest.fixture(scope="module")
def harness(lm_tasks):
    from mergekit_aim.tuning.harness import LmEvalTasks

    return LmEvalTasks(
        ["tiny_arith", "tiny_choice"], include_path=lm_tasks, limit=6, batch_size=4
    )


def test_lm_eval_scores_the_model_in_memory(family, plain, artifact, evals, harness):
    from transformers import AutoModelForCausalLM

    assert harness.metrics == {"tiny_arith/exact_match": True, "tiny_choice/acc": True}
    result = tune_merged(
        family.base,
        plain,
        artifact,
        {"lines": evals["lines"]},
        omegas=(0.0,),
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        lm_eval=harness,
        objective="tiny_choice/acc",
        keep={"lines": 0.5},
    )
    assert result.choice.objective == "tiny_choice/acc"
    for row in result.rows:
        assert set(row.scores) == {"lines", "tiny_arith/exact_match", "tiny_choice/acc"}
        acc = row.scores["tiny_choice/acc"]
        assert 0 <= acc.value <= 1 and acc.stderr is not None and acc.higher_is_better
        assert row.relax_s > 0 and row.score_s > 0
    # The plain row, scored in place after a relaxed candidate, equals the plain
    # merge loaded afresh: relaxing in place leaves nothing behind.
    fresh = harness.score(
        AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32),
        family.tokenizer,
    )
    plain_row = result.plain
    for name, score in fresh.items():
        assert plain_row.scores[name].value == pytest.approx(score.value)
    best = max(
        (r for r in result.rows if r.eligible),
        key=lambda r: (r.scores["tiny_choice/acc"].value, r.omega_attention),
    )
    assert result.chosen is best
    report = json.loads(json.dumps(result.to_json()))
    assert report["timing"]["relax_over_score"] > 0
    assert report["rows"][0]["metrics"]["tiny_choice/acc"]["stderr"] is not None
    table = result.to_markdown()
    assert (
        "| ω | lines | tiny_arith/exact_match | tiny_choice/acc | objective |" in table
    )
    assert " ± " in table


@pytest.mark.slow
def test_cli_lm_eval_end_to_end(family, artifact, data, lm_tasks, tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(merge_config(family)))
    out = tmp_path / "tuned"
    done = run_cli(
        "tune",
        config,
        "--importance",
        artifact,
        "--lm-eval",
        "tiny_arith,tiny_choice",
        "--lm-eval-include-path",
        lm_tasks,
        "--lm-eval-limit",
        4,
        "--eval",
        f"stories={data / 'stories.txt'}",
        "--keep",
        "tiny_choice=0.25",
        "--omega",
        0.3,
        "--seq-len",
        SEQ_LEN,
        "--quiet",
        out,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| tiny_arith/exact_match | tiny_choice/acc | objective |" in done.stdout
    report = json.loads((out / "aim_tune.json").read_text())
    assert report["keep"] == {"tiny_choice/acc": 0.25}
    assert report["objective_metric"] == "loss"
    assert report["lm_eval"]["limit"] == 4
    for row in report["rows"]:
        assert set(row["metrics"]) == {
            "stories",
            "tiny_arith/exact_match",
            "tiny_choice/acc",
        }
        assert row["relax_s"] > 0 and row["score_s"] > 0
    assert "lm-evaluation-harness" in (out / "README.md").read_text()
    assert not (out / ".aim-tune-work").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lm-eval", "nope"], "no task 'nope'"),
        (["--lm-eval", "tiny_arith,,x"], "comma-separated task names"),
        (["--lm-eval", "tiny_arith,tiny_choice"], "--objective: name the metric"),
        (["--lm-eval", "tiny_choice", "--keep", "tiny_arith"], "--keep 'tiny_arith'"),
        (["--lm-eval", "tiny_choice", "--lm-eval-limit", "0"], "--lm-eval-limit"),
        (["--eval", "STORIES", "--lm-eval-limit", "3"], "go with --lm-eval"),
        ([], "or lm-eval task (--lm-eval)"),
    ],
)
def test_lm_eval_settings_are_refused_before_merging(
    args, message, family, artifact, data, lm_tasks, tmp_path
):
    from mergekit_aim.cli import main

    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(merge_config(family)))
    out = tmp_path / "never"
    args = [a.replace("STORIES", f"stories={data / 'stories.txt'}") for a in args]
    if "--lm-eval" in args:
        args += ["--lm-eval-include-path", str(lm_tasks)]
    result = CliRunner().invoke(
        main, ["tune", str(config), "--importance", str(artifact), *args, str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
    assert not out.exists()


def test_lm_eval_missing_says_which_extra(monkeypatch, family, tmp_path):
    from mergekit_aim.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = CliRunner().invoke(
        main, ["tune", str(tmp_path / "c.yml"), "--lm-eval", "x", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "pip install 'mergekit-aim[eval]'" in result.output
    assert len(result.output.strip().splitlines()) == 1
