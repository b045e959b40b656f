"""The verdict rule: each claim of the paper an experiment tests is a `Check`, a paired
difference between two arms with its 95% interval (`evaluation.paired_interval`), and the
paper's expected sign.

    c = Check("hidden layers lower the loss", "1024->512->256 - none", "<",
              paired_interval(loss_best, loss_none), unit="points")
    c.holds        # "yes": the interval excludes 0 on the paper's side; "no": on the
                   # other side; "unclear": it includes 0
    verdict([c, ...], text)   # the document's verdict: overall word, checks, text

The rule is the same for every experiment and is decided before the runs: a check holds
or does not hold only when its interval excludes zero; otherwise it is "unclear", and its
text gives the interval and the smallest effect the seeds and examples could resolve
(the interval's half-width), so a reader sees whether more seeds could decide it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from funnelrec.experiments.evaluation import Interval

Holds = Literal["yes", "no", "unclear"]


@dataclass(frozen=True)
class Check:
    """One tested claim.

    name:     what the paper says, in a few words ("next-watch labels beat random ones")
    compared: the difference measured, "A - B" in the arms' names
    expect:   the paper's sign of the difference: ">" (A above B) or "<"
    interval: the paired difference A - B and its 95% interval
    metric:   what is compared ("map@100, seen excluded")
    scale, digits, unit: how the difference is printed (x scale, e.g. 100 for points)
    """

    name: str
    compared: str
    expect: Literal[">", "<"]
    interval: Interval
    metric: str
    scale: float = 1.0
    digits: int = 4
    unit: str = ""

    @property
    def holds(self) -> Holds:
        return decide(self.interval, self.expect)

    def difference(self) -> str:
        """'+0.0123 [+0.0045, +0.0201]' with the unit."""
        text = self.interval.text(self.digits, self.scale)
        return f"{text} {self.unit}".rstrip()

    def sentence(self) -> str:
        """The check and its outcome in one sentence, for a verdict's text."""
        word = {"yes": "holds", "no": "does not hold", "unclear": "unclear"}[self.holds]
        line = f"{self.name}: {word} ({self.compared}, {self.metric}: {self.difference()})"
        if self.holds == "unclear":
            line += f"; {resolution(self)}"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "compared": self.compared,
            "expect": self.expect,
            "metric": self.metric,
            "difference": self.interval.to_list(),
            "seeds": self.interval.seeds,
            "units": self.interval.units,
            "holds": self.holds,
        }


def decide(interval: Interval, expect: Literal[">", "<"]) -> Holds:
    """The rule: "yes" when the interval lies wholly on the paper's side of 0, "no" when
    wholly on the other side, "unclear" when it includes 0."""
    if interval.lo > 0.0:
        return "yes" if expect == ">" else "no"
    if interval.hi < 0.0:
        return "yes" if expect == "<" else "no"
    return "unclear"


def resolution(check: Check) -> str:
    """Why an unclear check is unclear: the effect measured against the smallest one the
    interval could have told from 0."""
    iv = check.interval
    f = f"{{:.{check.digits}f}}"
    return (
        f"the interval includes 0: an effect of {f.format(abs(iv.mean) * check.scale)} "
        f"{check.unit}".rstrip()
        + f" is below what {iv.seeds} seed(s) x {iv.units:,} units resolve here (half-width "
        f"{f.format(iv.half_width * check.scale)})"
    )


def overall(checks: Sequence[Check]) -> str:
    """One word for an experiment: "yes" (every check holds), "no" (at least one does not
    hold and none holds), "partly" (at least one holds and not all), "unclear" (none is
    decided). Whether every check is decided is said apart (`verdict`'s "decided")."""
    words = [c.holds for c in checks]
    if all(w == "unclear" for w in words):
        return "unclear"
    if "yes" not in words:
        return "no"
    return "yes" if all(w == "yes" for w in words) else "partly"


def verdict(checks: Sequence[Check], text: str) -> dict[str, Any]:
    """The document's verdict: the overall word, whether every check is decided, each
    check, and the text (the checks' sentences follow it)."""
    sentences = " ".join(f"({i}) {c.sentence()}." for i, c in enumerate(checks, 1))
    return {
        "holds": overall(checks),
        "decided": bool(checks) and all(c.holds != "unclear" for c in checks),
        "checks": [c.to_dict() for c in checks],
        "text": f"{text} {sentences}".strip(),
    }


def checks_table(checks: Sequence[Check]) -> dict[str, Any]:
    """The table of an experiment's checks: the paired differences and their intervals."""
    return {
        "title": "the paper's claims as paired differences (95% interval over seeds and units)",
        "columns": [
            "claim",
            "difference",
            "paper expects",
            "metric",
            "difference [95% CI]",
            "holds",
        ],
        "rows": [
            [c.name, c.compared, f"{c.expect} 0", c.metric, c.difference(), c.holds] for c in checks
        ],
    }
