"""How values look in the printed tables and the report: one rule everywhere."""

from __future__ import annotations


def cell(value, signed: bool = False) -> str:
    """'-' for a missing value, 4 significant digits for a number with a fraction, anything else as it is;
    signed: a change, shown with its sign."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    if signed and isinstance(value, int) and not isinstance(value, bool):
        return f"{value:+d}"
    return str(value)
