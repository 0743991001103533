"""AIM's part of planning one mergekit merge: artifact, routing, coverage.

An :class:`AimMergeSession` lives for one ``MergePlanner._plan`` call. It gets
the importance artifact before any tensor task exists (so a bad artifact fails
before anything is loaded or written), decides for every planned tensor whether
and with which ω it is relaxed (through the one relaxation core,
:mod:`mergekit_aim.relaxation`), routes those tasks to the AIM wrapper method,
and summarises what it did in a coverage report.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from mergekit.common import ImmutableMap

from mergekit_aim.checkpoint import CheckpointIndex, read_checkpoint
from mergekit_aim.config import PAPER_URL, AimConfig
from mergekit_aim.errors import AimConfigError
from mergekit_aim.importance import ImportanceMap, load_cached, resolve_artifact
from mergekit_aim.method import aim_method
from mergekit_aim.names import lazy_name_map
from mergekit_aim.relaxation import (
    Relaxation,
    Statistic,
    elements_text,
    find_statistic,
)

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedImportance:
    """A merge config's base model and the artifact its ``aim:`` block names."""

    base_model: Any
    checkpoint: CheckpointIndex
    artifact_path: str
    importance: ImportanceMap
    source: str


def resolve_importance(config: Any, options: Any) -> ResolvedImportance:
    """The ``aim:`` block's artifact: loaded (``importance:``) or calibrated
    through the cache (``calibration:``), checked against the base model."""
    aim: AimConfig = config.aim
    base_path = config.base_model.merged(
        cache_dir=options.lora_merge_cache,
        trust_remote_code=options.trust_remote_code,
        lora_merge_dtype=options.lora_merge_dtype,
    ).local_path(cache_dir=options.transformers_cache)
    checkpoint = read_checkpoint(base_path)
    if aim.importance is not None:
        path = resolve_artifact(aim.importance, cache_dir=options.transformers_cache)
        importance = load_cached(path)
        source = f"precomputed: {aim.importance}"
    else:
        from mergekit_aim.calibration.cache import calibrated_artifact

        path, importance = calibrated_artifact(
            base_path,
            checkpoint,
            aim.calibration,
            device=aim.calibration.device
            or options.device
            or ("cuda" if options.cuda else "cpu"),
            trust_remote_code=options.trust_remote_code,
            quiet=options.quiet,
            base_model_id=str(config.base_model),
        )
        source = f"calibrated on {aim.calibration.dataset} (cached at {path})"
    importance.check_against(checkpoint, source=path)
    return ResolvedImportance(config.base_model, checkpoint, path, importance, source)


class AimMergeSession:
    """AIM's state for one planning run: the artifact, the rule, the tally."""

    def __init__(
        self,
        aim: AimConfig,
        method_name: str,
        base_model: Any,
        checkpoint: CheckpointIndex,
        artifact_path: str,
        importance: ImportanceMap,
        source: str,
    ):
        self.aim = aim
        self.method_name = method_name
        self.base_model = base_model
        self.checkpoint = checkpoint
        self.artifact_path = artifact_path
        self.importance = importance
        self.source = source
        self.relaxation = Relaxation(aim.selection(), importance)
        self.coverage = self.relaxation.coverage
        # The base checkpoint's names ↔ the model's (transformers' conversion),
        # built on the first tensor whose name the checkpoint lacks.
        self.name_map = lazy_name_map(checkpoint)

    @classmethod
    def prepare(cls, config: Any, options: Any) -> AimMergeSession:
        """Resolve and check everything AIM needs; raise before any tensor work."""
        _check_cpu_kernel_choice()
        wrapper = aim_method(config.merge_method)
        found = resolve_importance(config, options)
        LOG.info(
            "AIM: %s with %s (%d statistics, artifact %s)",
            config.merge_method,
            wrapper.spec.name,
            len(found.importance),
            found.artifact_path,
        )
        return cls(
            config.aim,
            wrapper.spec.name,
            found.base_model,
            found.checkpoint,
            found.artifact_path,
            found.importance,
            found.source,
        )

    def route(self, task: Any, weight: Any, weights_in, models, cfg_reader) -> Any:
        """Return ``task`` unchanged, or re-targeted at the AIM wrapper."""
        base = cfg_reader.base_model
        if base != self.base_model:
            raise AimConfigError(
                f"tensor {weight.name}: its slice uses base_model {base}, but aim: "
                f"measured {self.base_model}; AIM needs one base model"
            )
        if base not in models:
            raise AimConfigError(
                f"tensor {weight.name}: the base model {base} is not among this "
                f"slice's sources, so AIM has no base weights to relax toward; add "
                f"it to the slice's sources"
            )
        base_weight = weights_in[models.index(base)]
        statistic = self._statistic(base_weight)
        decision = self.relaxation.decide(
            weight.name,
            statistic,
            cfg_reader.t,
            vocabulary=weight.vocabulary_axis is not None,
        )
        if not decision.relaxed:
            return task
        parameters = dict(task.parameters.items())
        parameters.update(
            omega=decision.omega,
            importance=self.artifact_path,
            importance_key=statistic.importance_key,
        )
        return task.model_copy(
            update={
                "method_name": self.method_name,
                "parameters": ImmutableMap(data=parameters),
            }
        )

    def _statistic(self, base_weight: Any) -> Statistic | None:
        # The statistic belongs to the base's own tensor (a moved layer in
        # slices: looks up the layer it came from), under whichever of the
        # weight's names the base checkpoint actually uses; a name mergekit
        # reads through transformers' conversion (a renamed router, a stack of
        # experts) takes the statistic(s) of the checkpoint tensors behind it.
        return find_statistic(
            (base_weight.name, *(base_weight.aliases or ())),
            self.checkpoint,
            self.importance,
            self.name_map,
        )

    def finish(self, *, quiet: bool = False) -> dict[str, Any]:
        """Report coverage and return what the model card shows.

        The one-line summary also goes to stderr unless ``quiet``: mergekit-yaml
        logs only warnings by default, and a user must be able to see that the
        ``aim:`` block took effect (the per-tensor lists are DEBUG logs). Every
        weight with an input that no statistic covers, and every expert without
        one, is a WARNING (always shown); with ``aim.require_full_coverage``
        they are an error, raised here: planning is not over, so mergekit has
        not created the output directory or written any tensor.
        """
        summary = self.coverage.summary()
        left = ", ".join(f"{n} {reason}" for reason, n in summary["left_alone"].items())
        line = "AIM coverage: relaxed {} of {} tensors{}; left alone: {}; {}".format(
            summary["relaxed"],
            summary["tensors"],
            _omega_text(summary),
            left or "none",
            elements_text(summary),
        )
        # A tied LM head is no tensor of its own in the checkpoint, so the
        # counts cannot show it; say outright that it was not relaxed.
        tied = tied_heads(self.importance)
        if tied:
            summary["tied_heads"] = tied
            line += "; {} tied to the input embedding, not relaxed".format(
                ", ".join(tied)
            )
        gaps = self.coverage.gaps()
        LOG.info(line)
        if not quiet:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        if gaps and self.aim.require_full_coverage:
            raise AimConfigError(
                "aim.require_full_coverage: some weights with an input would keep "
                "the merged value (nothing was written):\n  "
                + "\n  ".join(gaps)
                + "\n(calibrate with data that reaches them, exclude them with "
                "aim.exclude, or set require_full_coverage: false)"
            )
        for gap in gaps:
            LOG.warning(gap)
        for reason, names in self.coverage.decisions.items():
            LOG.debug("AIM %s: %s", reason, ", ".join(names))
        if summary["relaxed"] == 0:
            LOG.warning(
                "AIM relaxed no tensor: check aim.omega, aim.exclude and that the "
                "artifact belongs to this base model"
            )
        return {
            "coverage": summary,
            "artifact": self.artifact_path,
            "source": self.source,
            "provenance": self.importance.provenance,
            "paper": PAPER_URL,
        }


def tied_heads(importance: ImportanceMap) -> list[str]:
    """Output weights calibration found tied to the input embedding."""
    skipped = importance.provenance.get("skipped", {})
    return sorted(n for n, why in skipped.items() if str(why).startswith("tied"))


def _omega_text(summary: dict[str, Any]) -> str:
    if "omega_min" not in summary:
        return ""
    lo, hi = summary["omega_min"], summary["omega_max"]
    return f" (ω {lo:g})" if lo == hi else f" (ω {lo:g}–{hi:g})"


def _check_cpu_kernel_choice() -> None:
    """Refuse a bad ``MERGEKIT_AIM_CPU_KERNEL``, or a required native loop that
    cannot be built, now rather than at the first relaxed tensor."""
    from mergekit_aim.kernels import NativeKernelUnavailable, check_cpu_kernel

    try:
        check_cpu_kernel()
    except (ValueError, NativeKernelUnavailable) as err:
        raise AimConfigError(str(err)) from err
