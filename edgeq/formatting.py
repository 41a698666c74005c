"""How the `edgeq` command prints: aligned tables, byte sizes, milliseconds."""

from __future__ import annotations


def print_table(rows: list[list], header: list[str]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def ms(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def precision(label: str, nbytes: int, breakdown: dict) -> str:
    """'2-bit packed 1.2 KB (1/16.0 of their fp32 18.4 KB)' for the kernels' weights; bytes alone for the rest."""
    fp32 = breakdown.get("fp32_bytes")
    if not breakdown.get("layers") or not fp32:
        return f"{label} {mb(nbytes)}"
    ratio = f"1/{fp32 / nbytes:.1f} of" if nbytes < fp32 else f"{nbytes / fp32:.1f}x"
    return f"{label} {mb(nbytes)} ({ratio} their fp32 {mb(fp32)})"
