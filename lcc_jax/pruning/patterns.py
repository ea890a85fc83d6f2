"""Sparsity specs: unstructured ratios ("50%", "0.5") and N:M patterns ("2:4": 2 zeros in every 4).

N:M groups run along a kernel's input axis (axis 0 of a Flax (in, out) kernel), per output, so M
must divide the input dimension.
"""

from __future__ import annotations

import dataclasses
import re

from lcc_jax.errors import UserError


class SparsityError(UserError):
    """A sparsity spec that cannot be parsed or does not fit a matrix."""


@dataclasses.dataclass(frozen=True)
class SparsitySpec:
    """Either `ratio` (unstructured fraction of weights pruned, in [0, 1)) or `n:m` (n zeros of m).

    Build with `SparsitySpec.parse("2:4")`, `SparsitySpec(ratio=0.5)` or `SparsitySpec(n=2, m=4)`.
    """

    ratio: float | None = None
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.ratio is not None:
            if self.n or self.m:
                raise SparsityError(f"give either ratio or n:m, not both (ratio={self.ratio}, n:m={self.n}:{self.m}).")
            if not isinstance(self.ratio, (int, float)) or not 0.0 <= float(self.ratio) < 1.0:
                raise SparsityError(f"unstructured sparsity ratio must be in [0, 1), got {self.ratio!r}.")
            object.__setattr__(self, "ratio", float(self.ratio))
            return
        if self.n == self.m == 0:
            raise SparsityError("give a sparsity ratio in [0, 1) or an N:M pattern, e.g. SparsitySpec.parse('2:4').")
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n < self.m:
            raise SparsityError(
                f"N:M sparsity needs 0 < N < M (N zeros out of every M inputs), got {self.n}:{self.m}; "
                "e.g. '2:4' or '4:8'."
            )

    @property
    def is_nm(self) -> bool:
        return self.ratio is None

    @property
    def fraction(self) -> float:
        """Fraction of weights pruned: the ratio, or N/M."""
        return self.n / self.m if self.is_nm else self.ratio

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:.4g} ({100 * self.ratio:.4g}%)"

    @classmethod
    def parse(cls, text: str | float | SparsitySpec) -> SparsitySpec:
        """'50%', '0.5', '2:4', '4:8' (or a float, or a spec, returned as is)."""
        if isinstance(text, SparsitySpec):
            return text
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            return cls(ratio=float(text))
        if not isinstance(text, str):
            raise SparsityError(f"cannot read a sparsity spec from {text!r}.")
        s = text.strip()
        if match := re.fullmatch(r"(\d+)\s*:\s*(\d+)", s):
            return cls(n=int(match[1]), m=int(match[2]))
        if match := re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*%", s):
            return cls(ratio=float(match[1]) / 100.0)
        if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", s):
            value = float(s)
            if value >= 1.0:
                raise SparsityError(
                    f"sparsity {text!r} is not a ratio in [0, 1); write a percentage as '{s}%' or a fraction as "
                    f"'{value / 100:g}'."
                )
            return cls(ratio=value)
        raise SparsityError(f"cannot parse sparsity {text!r}; expected e.g. '50%', '0.5', '2:4' or '4:8'.")

    def check_input_dim(self, in_features: int, name: str = "matrix") -> None:
        """Raise unless this spec fits a kernel with `in_features` inputs (M must divide it)."""
        if self.is_nm and in_features % self.m:
            raise SparsityError(
                f"{name}: {self.n}:{self.m} sparsity needs the input dimension to be a multiple of {self.m}, "
                f"but it is {in_features}."
            )
