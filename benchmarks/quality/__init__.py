"""The quality benchmark: AIM against plain merges and two controls on tiny
models trained here (``python -m benchmarks.quality [--quick] --out DIR``).

Modules: :mod:`~benchmarks.quality.tasks` (generated items and text splits),
:mod:`~benchmarks.quality.training` (base, experts, calibration, cache),
:mod:`~benchmarks.quality.merging` (mergekit merges; AIM and the controls),
:mod:`~benchmarks.quality.metrics` (exact match, hypervolume),
:mod:`~benchmarks.quality.report` (tables and the Pareto plot).
"""
