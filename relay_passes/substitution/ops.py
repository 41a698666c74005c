"""The op vocabulary of the substitution graph: how each op a rule may create is emitted as Relax.

Ops imported from Relax keep their original call and are re-emitted with new arguments, so anything
(call_tir, packed calls, ops no rule knows) survives untouched. Ops created by rules are emitted from this
table. Two fused ops exist only inside the search, MetaFlow's fused representation: `edgeq.conv2d` and
`edgeq.matmul` carry an optional bias input and an activation, and lower to exactly the Relax chain
(conv2d/matmul, add, activation) that TVM's FuseOps turns into one kernel; pricing them as one op is what
makes the fuse rules pay off in the cost model.
"""

from __future__ import annotations

from tvm import relax

ACTIVATIONS = {"relax.nn.relu": relax.op.nn.relu, "relax.sigmoid": relax.op.sigmoid, "relax.tanh": relax.op.tanh}
ELEMENTWISE_BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")
# ops FuseOps puts into the kernel of the op producing their input (elementwise / broadcast)
ELEMENTWISE = ELEMENTWISE_BINARY + tuple(ACTIVATIONS) + ("relax.clip", "relax.nn.gelu", "relax.nn.silu", "relax.exp",
                                                         "relax.sqrt", "relax.negative")
CONV_LAYOUT = {"data_layout": "NCHW", "kernel_layout": "OIHW", "out_layout": "NCHW"}


def _fused(core):
    """Emit core(x, w) (+ bias) (+ activation), one binding each: the chain TVM fuses into one kernel."""

    def emit(bb, args, attrs):
        attrs = dict(attrs)
        act = attrs.pop("act", None)
        y = core(args[0], args[1], attrs)
        if len(args) > 2:
            y = relax.op.add(bb.emit(y), args[2])
        if act is not None:
            y = ACTIVATIONS[act](bb.emit(y))
        return y

    return emit


def _relax_op(name):
    """A Relax op by registry name, called with the node's inputs and attrs as keyword arguments."""
    fn = relax.op
    for part in name.split(".")[1:]:
        fn = getattr(fn, part)
    return lambda bb, args, attrs: fn(*args, **attrs)


def _concat(bb, args, attrs):
    return relax.op.concat(args[0], **attrs)


def _reshape(bb, args, attrs):
    return relax.op.reshape(args[0], args[1])


def _conv(x, w, attrs):
    return relax.op.nn.conv2d(x, w, **{**CONV_LAYOUT, **attrs})  # attrs may name other layouts (channels_last)


def _matmul(x, w, attrs):
    return relax.op.matmul(x, w, **attrs)


FUSED = ("edgeq.conv2d", "edgeq.matmul")  # core op (+ bias add) (+ activation): one kernel
EMIT = {
    "edgeq.conv2d": _fused(_conv),
    "edgeq.matmul": _fused(_matmul),
    "relax.concat": _concat,
    "relax.reshape": _reshape,
}


def emitter(op: str):
    """How a rule-created node of this op becomes a Relax expression: EMIT, else the Relax op itself."""
    return EMIT.get(op) or _relax_op(op)


def core_call(op: str, args, attrs):
    """The type-defining call of an op (fused ops have their core op's output type)."""
    attrs = {k: v for k, v in attrs.items() if k != "act"}
    if op == "edgeq.conv2d":
        return _conv(args[0], args[1], attrs)
    if op == "edgeq.matmul":
        return _matmul(args[0], args[1], attrs)
    return emitter(op)(None, args, attrs)
