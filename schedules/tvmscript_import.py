"""Make TVMScript parsing fast enough to import: TVM's decorators call `inspect.stack()` per function.

`@T.prim_func` and `@I.ir_module` capture `inspect.stack()`, which resolves the source file and line of every
frame on the stack. For frames of frozen importlib modules that lookup scans all of `sys.modules` each time, so
importing `tvm.s_tir.tensor_intrin` (~500 functions; done by every compile that tensorizes and by every
MetaSchedule builder process) took 20-130 s here. The parser only reads the frames themselves and the source
line of the third frame, so a stack that resolves source lines for the first three frames only gives the
parser the same answers (measured: 22 s -> 5.6 s).
"""

from __future__ import annotations

import inspect
import sys
import types

_FRAMES_WITH_SOURCE = 3  # is_defined_in_class reads frames[2].code_context


def _stack(context: int = 1) -> list[inspect.FrameInfo]:
    frame, frames = sys._getframe(1), []
    while frame is not None:
        if len(frames) < _FRAMES_WITH_SOURCE:
            info = inspect.getframeinfo(frame, context)
            frames.append(inspect.FrameInfo(frame, *info, positions=info.positions))
        else:
            code = frame.f_code
            frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None,
                                            positions=None))
        frame = frame.f_back
    return frames


def install() -> None:
    """Point TVM's script-parser entry modules at an `inspect` whose stack() is the cheap one (idempotent)."""
    from tvm.relax.script.parser import entry as relax_entry
    from tvm.script.parser.ir import entry as ir_entry
    from tvm.tirx.script.parser import entry as tirx_entry

    for module in (tirx_entry, ir_entry, relax_entry):
        if isinstance(module.inspect, types.ModuleType):
            module.inspect = types.SimpleNamespace(**{**vars(inspect), "stack": _stack})
