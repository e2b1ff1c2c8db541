"""The install builds the extension: without it the kernel tests would only skip, so this one fails."""

import os

from gemma3_fast import ops


def test_extension_is_built():
    if os.environ.get("GEMMA3_FAST_DISABLE_EXTENSION") == "1":
        return  # deliberately running the reference path
    assert ops.EXTENSION_AVAILABLE, ops.EXTENSION_ERROR
