"""The ablation's members: "<ranking>:<mode>:<top_k>:<learning rate>[:e<epochs>]" names, parsed (`MemberSpec`),
and the default grid and references (see `study.ablation`). Without `:e<N>` a member trains for the budget's
epochs; with it, for N (e.g. "probe:full:1.0:5e-3:e5")."""

from __future__ import annotations

import dataclasses
import re

from lcc_jax.errors import UserError
from lcc_jax.restore.top_k import TopK

PAPER = "probe:full:0.25:1e-3"
REFERENCES = (PAPER, "lofit:bias:0.25:1e-2", "probe:bias:0.25:1e-3")  # paper, LoFiT budget-matched, bias-only

DEFAULT_MEMBERS = (
    # which heads: the same count, the same learning rate
    PAPER, "probe-model:full:0.25:1e-3", "lofit:full:0.25:1e-3", "grad:full:0.25:1e-3", "random:full:0.25:1e-3",
    "probe-layers:full:0.25:1e-3",
    "probe:bias:0.25:1e-2", "lofit:bias:0.25:1e-2", "grad:bias:0.25:1e-2", "random:bias:0.25:1e-2",
    # what is trained, at a larger step
    "probe:full:0.25:5e-3", "probe:bias:0.25:5e-3", "probe:nobias:0.25:5e-3",
    "random:full:0.25:5e-3", "lofit:full:0.25:5e-3", "grad:full:0.25:5e-3",
    # the restricted span, the paper's idea taken literally
    "probe:span1:0.25:1e-2", "probe:span2:0.25:1e-2", "probe:span5:0.25:1e-2", "probe:span10:0.25:1e-2",
    # how many heads
    "probe:full:0.1:5e-3", "probe:full:0.5:5e-3", "probe:full:1.0:5e-3", "probe:bias:1.0:1e-2",
    # the learning rate
    "probe:full:0.25:1e-2", "probe:full:0.25:2e-2", "probe:bias:0.25:1e-3",
    # the epochs (the budget is 3; members with other epochs train in their own grid)
    "probe:full:0.25:1e-3:e5", "probe:full:1.0:5e-3:e1", "probe:full:1.0:5e-3:e5",
)

_MODES = {"full": "full", "bias": "bias_only", "nobias": "no_bias"}
RANKINGS = ("probe", "probe-model", "probe-layers", "lofit", "grad", "random")


class AblationError(UserError):
    """An ablation that cannot run as asked."""


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """One parsed member name."""

    name: str
    ranking: str
    mode: str  # Compensation mode
    span: int | None  # top-K directions only (mode "no_bias")
    top_k: TopK
    learning_rate: float
    epochs: int | None = None  # None: the budget's (RestoreConfig.epochs)

    @classmethod
    def parse(cls, name: str) -> MemberSpec:
        parts = name.split(":")
        epochs = None
        if len(parts) == 5:
            if not (m := re.fullmatch(r"e([1-9]\d*)", parts[4])):
                raise AblationError(f"member {name!r}: the fifth field is the epochs, e.g. 'e5', not {parts[4]!r}.")
            epochs, parts = int(m.group(1)), parts[:4]
        if len(parts) != 4:
            raise AblationError(f"member {name!r} must read '<ranking>:<mode>:<top_k>:<lr>[:e<epochs>]', "
                                f"e.g. {PAPER!r} or {PAPER + ':e5'!r}.")
        ranking, mode, top_k, lr = parts
        if ranking not in RANKINGS:
            raise AblationError(f"member {name!r}: ranking must be one of {', '.join(RANKINGS)}.")
        span = None
        if m := re.fullmatch(r"span(\d+)", mode):
            span, mode = int(m.group(1)), "no_bias"
        elif mode in _MODES:
            mode = _MODES[mode]
        else:
            raise AblationError(f"member {name!r}: mode must be full, bias, nobias or span<K>.")
        try:
            return cls(name, ranking, mode, span, TopK.parse(top_k), float(lr), epochs)
        except ValueError as e:
            raise AblationError(f"member {name!r}: {e}") from None
