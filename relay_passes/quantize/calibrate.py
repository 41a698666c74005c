"""Calibrate: run the fp32 model on calibration batches and collect a bounded-memory statistic per tensor.

The model runs through ``run`` (a batch -> {tensor: array} function the caller builds: edgeq compiles the model
for the host with every observed tensor added as an output, see edgeq.calibration); only the observers'
histograms are kept, never the activations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from targets.errors import raise_if_interrupted

from .observers import make_observer


def calibrate(run: Callable[[list[np.ndarray]], dict[str, np.ndarray]], tensors: list[str],
              batches: list[list[np.ndarray]], method: str = "minmax", activation_dtype: str = "uint8",
              progress: bool = False, low_bit: dict[str, int] | None = None,
              **options) -> dict[str, tuple[float, float]]:
    """{tensor: (lo, hi)}: the real range each tensor is quantized to, by the named calibration method.

    Tensors in ``low_bit`` (name -> bits) are PACT activations: their range is (0, alpha) with the alpha that
    minimizes clipping + quantization error at that bit width (observer "pact"), whatever the method.
    """
    from tqdm import tqdm

    low_bit = low_bit or {}
    bins = {"bins": options["bins"]} if "bins" in options else {}
    observers = {name: make_observer("pact", bits=low_bit[name], **bins) if name in low_bit
                 else make_observer(method, **options) for name in tensors}
    for batch in tqdm(batches, desc=f"calibrate ({method})", unit="batch", disable=None if progress else True,
                      leave=False):
        raise_if_interrupted()
        results = run(batch)
        for name, observer in observers.items():
            observer.update(results[name])
    return {name: observer.range(activation_dtype) for name, observer in observers.items()}
