"""`funnelrec experiment paper`: every experiment in turn, then one report of them all.

Experiments share the world, features and models under OUT/_shared, so the order below
also decides which experiment pays for shared work (the first to need it); each one's
wall and CPU time is recorded in OUT/paper/metrics.json and the report, with how every
experiment is run (`method`: seeds, the convergence rule, intervals, the verdict rule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from funnelrec.experiments.harness import Harness, Timer

NAME = "paper"


def run(h: Harness, experiments: dict[str, Callable[[Harness], dict[str, Any]]]) -> dict[str, Any]:
    """Run `experiments` (name -> run function) in order, then write the report of OUT."""
    from funnelrec.experiments.report import write_report

    timer = Timer()
    timings: dict[str, dict[str, float]] = {}
    verdicts: dict[str, dict[str, Any]] = {}
    for name, fn in experiments.items():
        h.console.rule(f"[bold]experiment {name}")
        t = Timer()
        doc = fn(h)
        timings[name] = t.seconds()
        verdicts[name] = doc.get("verdict", {})
        h.console.print(
            f"{name}: {verdicts[name].get('holds', '?')} ({timings[name]['wall_s']:.0f} s)"
        )
    total = timer.seconds()
    rows = [
        [
            name,
            verdicts[name].get("holds", "?"),
            _decided(verdicts[name]),
            f"{t['wall_s']:.0f}",
            f"{t['cpu_s']:.0f}",
        ]
        for name, t in timings.items()
    ]
    rows.append(["total", "", "", f"{total['wall_s']:.0f}", f"{total['cpu_s']:.0f}"])
    held = sum(v.get("holds") == "yes" for v in verdicts.values())
    decided = sum(bool(v.get("decided")) for v in verdicts.values())
    doc = {
        "title": "The paper's experiments on the simulated world: summary",
        "claim": None,
        "protocol": method(h),
        "tables": [
            {
                "title": "verdicts and time per experiment",
                "columns": [
                    "experiment",
                    "paper's direction holds",
                    "decided",
                    "wall s",
                    "CPU s",
                ],
                "rows": rows,
            }
        ],
        "figures": [],
        "verdict": {
            "holds": f"{held} of {len(verdicts)} hold, {decided} of {len(verdicts)} decided",
            "text": "; ".join(f"{n}: {v.get('holds', '?')}" for n, v in verdicts.items()),
        },
        "results": {"timings": timings, "total": total, "held": held, "decided": decided},
    }
    h.finish(NAME, doc, timer)
    report = write_report(h.root)
    h.console.print(f"report: {report.markdown} and {report.html}")
    return doc


def _decided(v: dict[str, Any]) -> str:
    """Whether every check of an experiment's verdict is decided (and how many are)."""
    checks = v.get("checks", [])
    done = sum(c.get("holds") != "unclear" for c in checks)
    return f"{'yes' if v.get('decided') else 'no'} ({done} of {len(checks)} checks)"


def method(h: Harness) -> str:
    """How every experiment is run: the world, seeds, convergence rule, intervals and the
    verdict rule (the report's "how the experiments are run")."""
    b = h.budget
    return (
        f"How the experiments are run. World: the {h.options.preset} preset, world seed "
        f"{h.options.world_seed}; the same world, features and held-out examples for every "
        f"arm. Seeds: every arm is trained with {len(h.seeds)} training seed(s) (0-"
        f"{len(h.seeds) - 1}). Training: every arm of every experiment trains under one "
        "rule (`Harness.convergence`): until its validation metric has not improved for "
        f"{b.patience} evaluations in a row, the best evaluated weights kept; candidate "
        f"models are evaluated every {b.cand_eval_every} steps of {b.cand_batch} by "
        f"Recall@100 of {b.valid_examples:,} validation examples (at most "
        f"{b.cand_max_steps:,} steps), rankers every {b.rank_eval_every} steps of "
        f"{b.rank_batch} by the weighted per-user loss of the validation split (at most "
        f"{b.rank_max_steps:,} steps); validation is the period after the training window "
        "(or each user's watch before the test one), never the test examples. Intervals: a "
        "claim is a paired difference between two arms on the same units (test examples, "
        "test users or requests) and seeds; its 95% interval is a percentile bootstrap "
        "that resamples units and seeds together. Verdict rule: a claim holds when the "
        "interval excludes 0 on the paper's side, does not hold when it excludes 0 on the "
        "other side, and is unclear otherwise (its text then gives the smallest effect "
        "the interval could resolve); an experiment holds (yes) when all its claims hold, "
        "not (no) when none does and all are decided, partly otherwise, and is decided "
        "when every claim is. Times include shared work (world, features, models) done by "
        "the first experiment that needs it; wall time (longer when other jobs share the "
        "machine) and CPU time of this process (worker processes not included)."
    )
