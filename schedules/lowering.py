"""Relax -> TIR lowering per target kind, with the best schedules available without tuning.

CPU: TVM's CPU pipeline (legalize, fuse) wrapped with edgeq's NHWC layout choice and default multi-core,
vectorized schedule, because untuned TVM CPU code is a single-threaded loop nest. GPU: TVM's own default pipeline, which schedules with dlight.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from .default_cpu import default_cpu_layout_passes, default_cpu_schedule


def lowering_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The relax_pipeline to hand to tvm.compile for this target."""
    if target.kind.name != "llvm":
        return relax.get_default_pipeline(target)
    passes = (default_cpu_layout_passes(target)
              + cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
              + [default_cpu_schedule(target)]
              + cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target))

    @tvm.transform.module_pass(opt_level=0, name="edgeq_cpu_lowering")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline
