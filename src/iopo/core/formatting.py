"""Numbers, intervals and the metrics table as text: the one place the printed tables, the report and the online
summaries format a value. Pure functions of values; no torch, no I/O."""

from __future__ import annotations

import math


def number(value, digits: int = 3, width: int = 0, missing: str = "n/a") -> str:
    """`value` with `digits` decimals, right-aligned in `width`; `missing` for None, NaN or infinity."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{missing:>{width}}"
    return f"{value:{width}.{digits}f}"


def interval(table: dict, key: str, digits: int = 3, width: int = 0) -> str:
    """table[key] and its interval table["ci"][key] as "0.500 [0.300, 0.700]"."""
    low, high = (table.get("ci") or {}).get(key) or (None, None)
    return f"{number(table.get(key), digits, width)} [{number(low, digits, width)}, {number(high, digits, width)}]"


def rate(value) -> str:
    """A share or a score in the printed tables: five characters wide, three decimals."""
    return number(value, 3, 5)


def rate_interval(table: dict, key: str) -> str:
    return interval(table, key, 3, 5)


def metrics_table(results: dict, title: str) -> str:
    """The implicit-reward metrics of one model on a test split (Sec. 6.2) as a small two-column table."""
    rows = [
        ("pairs", f"{results['n_pairs']}"),
        ("beta", f"{results['beta']:g}"),
        ("margin reward", number(results["margin_reward"], 4)),
        ("pairwise accuracy", number(results["pairwise_accuracy"], 4)),
        ("reward chosen", number(results["reward_chosen"], 4)),
        ("reward rejected", number(results["reward_rejected"], 4)),
    ]
    if results.get("non_finite_pairs"):
        rows.append(("non-finite pairs", f"{results['non_finite_pairs']}"))
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 12)]
    lines += [f"{k:<{width}}  {v:>10}" for k, v in rows]
    return "\n".join(lines)
