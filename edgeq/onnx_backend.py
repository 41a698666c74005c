"""edgeq as an ONNX backend (onnx.backend.base.Backend): what onnx's own conformance suite runs a model through.

``EdgeqBackend.prepare(model)`` imports and compiles for this machine (fp32, or integer kernels for a QDQ
model, as ``edgeq compile --target host`` does, without writing an artifact); the returned rep runs inputs
given positionally, in the order of the graph's inputs, as the backend API requires.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep


class EdgeqRep(BackendRep):
    def __init__(self, model: onnx.ModelProto, target: str = "host"):
        import targets
        import tvm
        from tvm import relax

        from .compiler import compile_module
        from .frontend import load_onnx

        self.model = load_onnx(model)
        self.vm = relax.VirtualMachine(compile_module(self.model, targets.resolve(target)), tvm.cpu())

    def run(self, inputs, **kwargs):
        import tvm

        from .errors import EdgeqError

        arrays = [np.asarray(a) for a in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
        if len(arrays) != len(self.model.inputs):
            raise EdgeqError(f"{len(arrays)} inputs given, the model takes {len(self.model.inputs)}")
        for array, spec in zip(arrays, self.model.inputs):
            if tuple(array.shape) != tuple(spec.shape) or array.dtype.name != spec.dtype:
                raise EdgeqError(f"input {spec.name}: {array.dtype.name}{list(array.shape)} given, "
                                 f"the model was compiled for {spec.dtype}{list(spec.shape)}")
        result = self.vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
        results = list(result) if len(self.model.outputs) > 1 else [result]
        return tuple(r.numpy() for r in results)


class EdgeqBackend(Backend):
    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> EdgeqRep:
        super().prepare(model, device, **kwargs)
        return EdgeqRep(model)

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs, device: str = "CPU", **kwargs):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


prepare = EdgeqBackend.prepare
run_model = EdgeqBackend.run_model
supports_device = EdgeqBackend.supports_device
