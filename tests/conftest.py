"""Session-wide test setup."""

import os
from pathlib import Path

# Without an NVIDIA GPU the Triton kernels of the cuda backend run in Triton's interpreter (on CPU tensors).
# It must be chosen before any kernel is decorated, so it is set here, before test modules import them.
if "TRITON_INTERPRET" not in os.environ and not Path("/dev/nvidia0").exists():
    os.environ["TRITON_INTERPRET"] = "1"
