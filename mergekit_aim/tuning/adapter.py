"""``mergekit-aim tune-adapter``: choose ω for a LoRA adapter, write it relaxed.

Relaxing an adapter is exact: the merged weights of the adapter relaxed at ω
equal AIM at ω applied to the adapter's merged weights (up to float32
rounding). So the search is ``tune``'s own
(:func:`~mergekit_aim.tuning.search.tune_merged`: the same candidates,
scorer, objective and pick, and whatever objectives it gains). The adapter
is merged into the base once (``merge_and_unload``, float32, in a work
directory under the output), every candidate ω relaxes that merge in memory
and is scored, and the pick's ω setting is written as a relaxed adapter by
:func:`~mergekit_aim.adapters.relax_adapter`. The work directory is removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mergekit_aim.adapters import (
    adapter_dirs,
    check_adapter,
    relax_adapter,
    require_peft,
)
from mergekit_aim.errors import AimConfigError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.selection import setting_json
from mergekit_aim.tuning.evaluation import (
    check_dtype,
    check_eval_settings,
    read_eval_texts,
)
from mergekit_aim.tuning.search import (
    DEFAULT_OMEGAS,
    TuneResult,
    omega_grid,
    tune_merged,
)

LOG = logging.getLogger(__name__)

_WORK_DIR = ".aim-tune-work"


def tune_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    importance: ImportanceMap,
    evals: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    omegas: Sequence[float] = DEFAULT_OMEGAS,
    split_attention_mlp: bool = False,
    exclude: Iterable[str] = (),
    seq_len: int = 512,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: str = "auto",
) -> TuneResult:
    """Pick ω for the LoRA ``adapter`` of ``base`` on ``evals`` (name →
    ``.txt``/``.jsonl`` file) and write the adapter relaxed at the pick to
    ``out`` (which must not exist or be empty), with ``aim_tune.json`` and
    ``aim_tune.md``. Everything is checked before ``out`` is created."""
    require_peft()
    omega_grid(omegas, split_attention_mlp)
    check_eval_settings(seq_len, batch_size)
    check_dtype(dtype)
    if not evals:
        raise AimConfigError("give at least one eval set (--eval NAME=FILE)")
    found = adapter_dirs(adapter)
    if found != [Path(adapter)]:
        raise AimConfigError(
            f"--adapter {adapter}: tune one adapter at a time; it holds "
            f"{len(found)} ({', '.join(str(p) for p in found[:3])})"
        )
    texts = {str(name): read_eval_texts(path) for name, path in evals.items()}
    exclude = list(exclude)
    # What relax_adapter would refuse at the end (DoRA, a shape that does not
    # fit the base, …) is refused before the merge and the scoring.
    check_adapter(base, adapter, importance, exclude=exclude)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AimConfigError(f"output directory {out} exists and is not empty")

    created = not out.exists()
    work = out / _WORK_DIR
    try:
        merged = _merge_and_unload(base, adapter, work / "merged")
        result = tune_merged(
            base,
            merged,
            importance,
            texts,
            omegas,
            split_attention_mlp=split_attention_mlp,
            seq_len=seq_len,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            exclude=exclude,
        )
        shutil.rmtree(work)
        setting = setting_json(result.chosen.setting)
        relax_adapter(base, adapter, importance, setting, out, exclude=exclude)
        result.model_dir = out
        report = {**result.to_json(), "adapter": str(adapter), "exclude": exclude}
        (out / "aim_tune.json").write_text(
            json.dumps(report, indent=2, sort_keys=True, default=str), "utf-8"
        )
        (out / "aim_tune.md").write_text(result.to_markdown() + "\n", "utf-8")
    except BaseException:
        shutil.rmtree(out if created else work, ignore_errors=True)
        raise
    LOG.info("tune-adapter: wrote %s (ω %s)", out, result.chosen.label())
    return result


def _merge_and_unload(base: str | os.PathLike, adapter: str | os.PathLike, to: Path):
    """The base with ``adapter`` merged in (float32), saved to ``to``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(to)
    return to
