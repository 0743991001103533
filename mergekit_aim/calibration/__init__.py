"""The calibration provider: measure a base model's input activations.

:func:`calibrate` is the one orchestrator: settings
(:class:`~mergekit_aim.calibration.settings.CalibrationConfig`) → token blocks
(:mod:`~mergekit_aim.calibration.data`) → the loaded model
(:mod:`~mergekit_aim.calibration.loading`) → the forward loop
(:mod:`~mergekit_aim.calibration.forward`) with the observer
(:mod:`~mergekit_aim.calibration.observer`) on the target modules
(:mod:`~mergekit_aim.calibration.targets`) → an
:class:`~mergekit_aim.importance.ImportanceMap` with its provenance.
:func:`collect_importance` is the forward loop alone, for a model already
loaded. The calibration cache (:mod:`~mergekit_aim.calibration.cache`) and the
CLI go through :func:`calibrate`.

This module stays light (no torch or transformers until a function runs), so
that ``mergekit_aim.config`` can take ``CalibrationConfig`` from here cheaply.
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Any

from mergekit_aim.calibration.settings import (
    FALLBACK_DEVICE,
    CalibrationConfig,
    calibration_config,
)
from mergekit_aim.errors import CalibrationError

if TYPE_CHECKING:
    from mergekit_aim.calibration.data import CalibrationBlocks
    from mergekit_aim.importance import ImportanceMap

__all__ = ["CalibrationConfig", "calibrate", "calibration_blocks", "collect_importance"]


def __getattr__(name: str) -> Any:
    # collect_importance lives in forward.py, which imports torch.
    if name == "collect_importance":
        from mergekit_aim.calibration.forward import collect_importance

        return collect_importance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def calibration_blocks(
    config: CalibrationConfig, tokenizer: Any, *, trust_remote_code: bool = False
) -> CalibrationBlocks:
    """Sample and pack the token blocks ``config`` describes (see
    :func:`mergekit_aim.calibration.data.build_blocks`)."""
    from mergekit_aim.calibration.data import build_blocks

    return build_blocks(
        config.dataset,
        tokenizer,
        num_samples=config.num_samples,
        seq_len=config.seq_len,
        seed=config.seed,
        split=config.split,
        text_column=config.text_column,
        trust_remote_code=trust_remote_code,
        bos_per_block=config.bos_per_block,
    )


def calibrate(
    model_or_path: Any,
    config: CalibrationConfig | None = None,
    *,
    tokenizer: Any = None,
    blocks: CalibrationBlocks | None = None,
    trust_remote_code: bool = False,
    quiet: bool = False,
    **settings: Any,
) -> ImportanceMap:
    """Calibrate a base model (path, Hub id or loaded model) on a dataset.

    ``config`` holds the settings (default: :class:`CalibrationConfig`'s
    defaults); keyword ``settings`` name its fields and override it, e.g.
    ``calibrate(path, dataset="builtin", num_samples=128)``. An unknown or
    invalid setting raises :class:`~mergekit_aim.errors.AimConfigError`
    before anything is loaded.

    Samples and packs the data the paper's way (see
    :func:`mergekit_aim.calibration.data.build_blocks`; ``bos_per_block``
    ``"auto"``, True or False chooses whether every block starts with BOS),
    runs the model, and returns an :class:`ImportanceMap` whose provenance
    names the base model, its fingerprint, the settings and the data
    fingerprint. ``blocks`` may be a prebuilt ``CalibrationBlocks`` (skips
    sampling; the packing recorded is the blocks' own). Under ``torchrun``
    every rank builds the same blocks, measures its share of them, and all
    ranks return the combined map (see
    :mod:`mergekit_aim.calibration.distributed`).
    """
    config = calibration_config(config, **settings)

    from mergekit_aim import __version__
    from mergekit_aim.calibration import forward
    from mergekit_aim.calibration.distributed import setup, shard
    from mergekit_aim.calibration.loading import load_base_model, offload_directory
    from mergekit_aim.checkpoint import read_checkpoint, resolve_local_path
    from mergekit_aim.output import remove_tree

    ranks, device = setup(config.device or FALLBACK_DEVICE)
    if isinstance(model_or_path, (str, os.PathLike)):
        base_id = str(model_or_path)
        path = resolve_local_path(base_id)
        checkpoint = read_checkpoint(path)
        model = None
    else:
        model = model_or_path
        base_id = getattr(model, "name_or_path", "") or type(model).__name__
        path = base_id if os.path.isdir(base_id) else None
        checkpoint = read_checkpoint(path) if path else None
    if blocks is None:
        if tokenizer is None:
            if path is None:
                raise CalibrationError(
                    "pass tokenizer= (the model has no local directory to load "
                    "one from)"
                )
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                path, trust_remote_code=trust_remote_code
            )
        blocks = calibration_blocks(
            config, tokenizer, trust_remote_code=trust_remote_code
        )
    # A capped run's offload directory is ours unless the user named one: it
    # goes as soon as the forward pass ends, whatever ends it.
    owned = None
    if model is None and config.max_memory is not None and not config.offload_dir:
        owned = offload_directory()
    try:
        if model is None:
            model = load_base_model(
                path,
                device=device,
                dtype=config.dtype,
                trust_remote_code=trust_remote_code,
                max_memory=config.max_memory,
                offload_dir=str(owned) if owned else config.offload_dir,
            )
        importance = forward.collect_importance(
            model,
            shard(blocks.tokens, ranks),
            config.batch_size,
            checkpoint_names=None if checkpoint is None else set(checkpoint.tensors),
            progress=not quiet and ranks.is_main,
        )
    finally:
        if owned is not None:
            remove_tree(owned)
    importance.provenance.update(
        {
            "base_model": base_id,
            "base_fingerprint": None if checkpoint is None else checkpoint.fingerprint,
            "calibration": {
                "dataset": blocks.dataset,
                "split": config.split,
                "text_column": config.text_column,
                "num_samples": config.num_samples,
                "seq_len": int(blocks.tokens.shape[1]),
                "seed": config.seed,
                "dtype": config.dtype,
                "num_blocks": int(blocks.tokens.shape[0]),
                "num_texts": blocks.num_texts,
                # Read from the blocks, which may have been built elsewhere:
                # the packing recorded must be the one measured.
                "bos_per_block": blocks.description.get("bos_per_block"),
                "bos_per_block_resolved": blocks.description.get(
                    "bos_per_block_resolved"
                ),
            },
            "data_fingerprint": blocks.fingerprint,
            "data": blocks.description,
            "mergekit_aim_version": __version__,
            # What `mergekit-aim inspect` shows as when and in which dtype.
            "created": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M UTC"
            ),
            "model_dtype": str(getattr(model, "dtype", "")).removeprefix("torch.")
            or None,
        }
    )
    return importance
