"""Choosing ω on held-out text: evaluation, the ω search, the ``tune`` command.

- :mod:`~mergekit_aim.tuning.evaluation`: the one NLL scorer (mean token
  negative log-likelihood over fixed windows), eval-file reading, and the
  scoring interface every scorer implements (``Score``, ``LossSets``);
- :mod:`~mergekit_aim.tuning.harness`: lm-evaluation-harness tasks as a
  scorer (the optional extra ``eval``);
- :mod:`~mergekit_aim.tuning.search`: candidates, scoring, the pick
  (skill floors, then the objective);
- :mod:`~mergekit_aim.tuning.command`: ``mergekit-aim tune`` end to end.
"""

from mergekit_aim.tuning.command import tune
from mergekit_aim.tuning.evaluation import Score, evaluate_loss
from mergekit_aim.tuning.search import (
    DEFAULT_OMEGAS,
    OBJECTIVE,
    Choice,
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
    "Choice",
    "Score",
    "TuneResult",
    "TuneRow",
    "candidate_tensors",
    "evaluate_loss",
    "omega_grid",
    "parse_omegas",
    "tune",
    "tune_merged",
]
