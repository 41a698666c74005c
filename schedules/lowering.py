"""Relax -> TIR lowering per target kind, with the best schedules available without tuning.

CPU: TVM's CPU pipeline (legalize, fuse) wrapped with edgeq's NHWC layout choice, tuned schedules where a
tuning database has a better one, and otherwise edgeq's default multi-core, vectorized schedule, because untuned TVM CPU code is a single-threaded loop nest. GPU: TVM's own default pipeline, which schedules with dlight.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from .concat_parts import CONCAT_PARTS
from .default_cpu import default_cpu_layout_passes, default_cpu_schedule
from .fast_math import FAST_MATH
from .grouped_conv import GROUPED_CONV
from .padded_matmul import PADDED_MATMUL
from .reductions import INFINITE_START_REDUCTIONS
from .apply_tuning import tuned_schedules


def pre_schedule_passes(target: tvm.target.Target) -> list:
    """Layout, legalization and fusion: the fused PrimFuncs they leave are what gets scheduled or tuned."""
    return (default_cpu_layout_passes(target)
            + cpu_generic.library_dispatch_passes(target)
            + [relax.transform.LegalizeOps({**INFINITE_START_REDUCTIONS, **FAST_MATH, **GROUPED_CONV,
                                            **PADDED_MATMUL, **CONCAT_PARTS})]
            + cpu_generic.legalize_passes(target)
            + [relax.transform.AttachAttrLayoutFreeBuffers()])  # marks weight params for compile-time repacking


def pre_schedule(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    with target:
        return tvm.transform.Sequential(pre_schedule_passes(target))(mod)


def lowering_pipeline(target: tvm.target.Target, tuning_databases=(), applied: list | None = None) -> tvm.transform.Pass:
    """The relax_pipeline to hand to tvm.compile for this target; CPU kernels with a tuned schedule in one of
    `tuning_databases` (directories) that beats the default get it (their names are appended to `applied`)."""
    if target.kind.name != "llvm":
        return relax.get_default_pipeline(target)
    tuned = [tuned_schedules(list(tuning_databases), target, applied)] if tuning_databases else []
    passes = (pre_schedule_passes(target) + tuned + [default_cpu_schedule(target)]
              + cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target))

    @tvm.transform.module_pass(opt_level=0, name="edgeq_cpu_lowering")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline
