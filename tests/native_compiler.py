"""Skip marker for tests that need the native CPU relaxation to be buildable."""

import pytest

from mergekit_aim.kernels import _native


def has_compiler() -> bool:
    try:
        _native.compiler()
    except _native.NativeKernelUnavailable:
        return False
    return True


# Without a C compiler the native loop cannot exist; what must still hold then
# (a warning, the torch path, an error in "native" mode) is tested with a fake
# compiler and runs everywhere.
needs_compiler = pytest.mark.skipif(not has_compiler(), reason="no C compiler")
