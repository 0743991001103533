"""Choosing ω on held-out text: evaluation, the ω search, the ``tune`` command.

- :mod:`~mergekit_aim.tuning.evaluation`: the one NLL scorer (mean token
  negative log-likelihood over fixed windows) and eval-file reading;
- :mod:`~mergekit_aim.tuning.search`: candidates, scoring, the pick;
- :mod:`~mergekit_aim.tuning.command`: ``mergekit-aim tune`` end to end.
"""

from mergekit_aim.tuning.command import tune
from mergekit_aim.tuning.evaluation import evaluate_loss
from mergekit_aim.tuning.search import (
    DEFAULT_OMEGAS,
    OBJECTIVE,
    TuneResult,
    TuneRow,
    candidate_tensors,
    omega_grid,
    parse_omegas,
    tune_merged,
)

__all__ = [
    "DEFAULT_OMEGAS",
    "OBJECTIVE",
    "TuneResult",
    "TuneRow",
    "candidate_tensors",
    "evaluate_loss",
    "omega_grid",
    "parse_omegas",
    "tune",
    "tune_merged",
]
