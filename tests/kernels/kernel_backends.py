"""The backends every kernel test runs: Triton on CPU only under the interpreter."""

import os

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="Triton on CPU needs TRITON_INTERPRET=1"
)
BACKENDS = ["auto", "torch", pytest.param("triton", marks=needs_interpreter)]
