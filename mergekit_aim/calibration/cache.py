"""The calibration cache: compute an importance artifact once per base model,
calibration settings and data, reuse it in every later merge.

Entries live in ``$MERGEKIT_AIM_CACHE`` (default ``$XDG_CACHE_HOME/mergekit-aim``
or ``~/.cache/mergekit-aim``), one safetensors file per key. The key hashes the
base model's fingerprint, the settings that change the statistic and the
fingerprint of the exact token blocks, so editing a local dataset or swapping
the tokenizer computes a new entry. Entries are written atomically; one that
fails to load or does not match its key is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging

from mergekit_aim.cache_location import cache_dir
from mergekit_aim.calibration import calibrate, calibration_blocks
from mergekit_aim.calibration.settings import CalibrationConfig
from mergekit_aim.checkpoint import CheckpointIndex
from mergekit_aim.errors import ImportanceError
from mergekit_aim.importance import FORMAT_VERSION, ImportanceMap, load_cached

LOG = logging.getLogger(__name__)


def cache_key(base_fingerprint: str, settings: dict, data_fingerprint: str) -> str:
    payload = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "base": base_fingerprint,
            "settings": settings,
            "data": data_fingerprint,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def calibrated_artifact(
    base_path: str,
    checkpoint: CheckpointIndex,
    settings: CalibrationConfig,
    *,
    device: str,
    trust_remote_code: bool = False,
    quiet: bool = False,
    base_model_id: str | None = None,
) -> tuple[str, ImportanceMap]:
    """Path and map of the cached artifact for these settings, computing it if
    the cache has no valid entry.

    The blocks are built once: their fingerprint is part of the key, and a
    miss measures those same blocks through :func:`calibrate` on ``device``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        base_path, trust_remote_code=trust_remote_code
    )
    blocks = calibration_blocks(
        settings, tokenizer, trust_remote_code=trust_remote_code
    )
    key = cache_key(
        checkpoint.fingerprint, settings.cache_settings(), blocks.fingerprint
    )
    path = cache_dir() / f"{key[:40]}.safetensors"
    if path.exists():
        try:
            found = load_cached(str(path))
            if found.provenance.get("cache_key") != key:
                raise ImportanceError(f"{path} belongs to another cache key")
            LOG.info("AIM: using cached importance %s", path)
            return str(path), found
        except ImportanceError as error:
            LOG.warning("AIM: discarding unusable cache entry (%s); recomputing", error)
            path.unlink(missing_ok=True)
    LOG.info(
        "AIM: calibrating %s on %s (%d blocks of %d tokens)",
        base_model_id or base_path,
        settings.dataset,
        blocks.tokens.shape[0],
        blocks.tokens.shape[1],
    )
    importance = calibrate(
        base_path,
        settings.model_copy(update={"device": device}),
        tokenizer=tokenizer,
        blocks=blocks,
        trust_remote_code=trust_remote_code,
        quiet=quiet,
    )
    if base_model_id:
        importance.provenance["base_model"] = base_model_id
    importance.provenance["cache_key"] = key
    importance.save(path)
    return str(path), load_cached(str(path))
