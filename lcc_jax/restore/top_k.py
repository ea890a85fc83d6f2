"""How many heads to compensate (`--top-k`): a count of heads or a fraction of all L·H heads, parsed once.

    TopK.parse(68), TopK.parse("68")           a count: 68 heads                 (HeadCount)
    TopK.parse(0.25), "0.25", "25%"            a fraction: a quarter of the heads (HeadFraction)
    TopK.parse(1.0), "1.0", "100%"             every head (not one)
    TopK.parse(68.0)                           a count (older configurations stored counts as floats)

A parsed value is also the number it stands for (`HeadCount` is an int, `HeadFraction` a float), so it compares,
prints and is written to run.json and result files exactly as before; `resolve(total)` is the number of heads it
means for a model with `total` heads. `RestoreConfig` and `LofitConfig` parse their `top_k` on construction;
functions that take one (`init_compensation`, `init_bias_only`) accept a number too and parse it the same way.
"""

from __future__ import annotations

import numbers

from lcc_jax.errors import UserError

__all__ = ["HeadCount", "HeadFraction", "TopK"]


class TopK:
    """A parsed `top_k`: a `HeadCount` or a `HeadFraction` (build with `TopK.parse`)."""

    __slots__ = ()

    @staticmethod
    def parse(value: TopK | int | float | str) -> TopK:
        """A count (int >= 1) or a fraction (float in (0, 1]) of heads, from a number or a command-line string.

        "68" and 68 are counts; "0.25", "25%" and 0.25 are fractions, and "1.0" / 1.0 / "100%" mean every
        head (not one). An integral float above 1 (68.0) is a count. A TopK is returned as it is.
        """
        if isinstance(value, TopK):
            return value
        if isinstance(value, bool):
            raise UserError(f"top_k must be a count or a fraction of heads, not {value!r}.")
        if isinstance(value, str):
            text = value.strip()
            try:
                if text.endswith("%"):
                    value = float(text[:-1]) / 100.0
                elif any(c in text for c in ".eE"):
                    value = float(text)
                else:
                    value = int(text)
            except ValueError:
                raise UserError(f"top_k (--top-k) {value!r} is neither a count (68) nor a fraction (0.25, 25%)."
                                ) from None
        if isinstance(value, numbers.Integral):  # numpy integers too
            value = int(value)
        elif isinstance(value, numbers.Real):
            value = float(value)
        if isinstance(value, float) and value > 1 and value.is_integer():
            value = int(value)
        if isinstance(value, float):
            return HeadFraction(value)
        if isinstance(value, int):
            return HeadCount(value)
        raise UserError(f"top_k must be a count or a fraction of heads, not {value!r}.")

    @property
    def is_fraction(self) -> bool:
        return isinstance(self, HeadFraction)

    def resolve(self, total: int) -> int:
        """The number of heads this means for a model with `total` heads."""
        raise NotImplementedError


class HeadCount(TopK, int):
    """`top_k` heads exactly (at least 1; at most the model's heads, checked by `resolve`)."""

    __slots__ = ()

    def __new__(cls, value: int) -> HeadCount:
        if value < 1:
            raise UserError(f"top_k (--top-k) must be a positive count of heads (e.g. 68) or a fraction in (0, 1] "
                            f"(0.25, 25%; 1.0 = every head), not {value}.")
        return super().__new__(cls, value)

    def resolve(self, total: int) -> int:
        if not 1 <= self <= total:
            raise UserError(
                f"top_k (--top-k) {int(self)} is outside the model's {total} heads: pass a count from 1 to {total}, "
                "or a fraction such as 0.25 (structured pruning leaves fewer heads than the dense model has)."
            )
        return int(self)


class HeadFraction(TopK, float):
    """A fraction in (0, 1] of all heads, rounded, at least 1 head."""

    __slots__ = ()

    def __new__(cls, value: float) -> HeadFraction:
        if not 0 < value <= 1:
            raise UserError(f"a fractional top_k (--top-k) must be in (0, 1] (1.0 = every head), not {value}; pass "
                            "a whole number for a count of heads.")
        return super().__new__(cls, value)

    def resolve(self, total: int) -> int:
        return max(1, round(float(self) * total))
