"""edgeq: compile ONNX models into small, fast, verified artifacts for edge devices (Apache TVM, Relax)."""

__version__ = "0.1.0"

from .artifact import Artifact  # noqa: E402
from .build import build  # noqa: E402
from .errors import EdgeqError  # noqa: E402
from .frontend import ImportedModel, load_onnx  # noqa: E402

__all__ = ["Artifact", "EdgeqError", "ImportedModel", "build", "load_onnx", "__version__"]
