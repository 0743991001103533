"""lm-evaluation-harness tasks for the quality benchmark's four tasks.

``aim_math`` and ``aim_instructions`` (greedy answer, exact match after
stripping surrounding whitespace), ``aim_code`` and ``aim_general`` (rolling
log-likelihood of held-out text: bits per byte, byte and word perplexity).
Their data is generated, never copied: ``python -m
benchmarks.quality.lm_eval_tasks [--model NAME | --quick | --smoke]`` writes
the splits the benchmark itself draws (:func:`benchmarks.quality.training.build_data`)
as JSON lines under ``data/`` here (or ``--out DIR``, read back through
``MERGEKIT_AIM_LM_EVAL_DATA``). Use them with
``mergekit-aim tune ... --lm-eval aim_math,aim_code --lm-eval-include-path
benchmarks/quality/lm_eval_tasks``. Each task scores the benchmark's test
split; ``aim_<task>_validation`` scores its validation split, the one to
choose ω on (the test split stays for judging the choice).
"""
