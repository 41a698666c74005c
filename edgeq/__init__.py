"""edgeq: compile ONNX models into small, fast, verified artifacts for edge devices (Apache TVM, Relax)."""

import os

# TVM's runtime may start fewer threads than there are CPUs (1 of 2 on our 2-core CI machine): use all unless
# the user chose (the pool reads this once, when the first parallel kernel runs).
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from .artifact import Artifact  # noqa: E402
from .build import build  # noqa: E402
from .errors import EdgeqError  # noqa: E402
from .frontend import ImportedModel, load_onnx  # noqa: E402
from .quantize import QuantizedModel, quantize  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ["Artifact", "EdgeqError", "ImportedModel", "QuantizedModel", "build", "load_onnx", "quantize",
           "__version__"]
