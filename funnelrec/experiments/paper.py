"""`funnelrec experiment paper`: every experiment in turn, then one report of them all.

Experiments share the world, features and models under OUT/_shared, so the order below
also decides which experiment pays for shared work (the first to need it); each one's
wall and CPU time is recorded in OUT/paper/metrics.json and the report.
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
        [name, verdicts[name].get("holds", "?"), f"{t['wall_s']:.0f}", f"{t['cpu_s']:.0f}"]
        for name, t in timings.items()
    ]
    rows.append(["total", "", f"{total['wall_s']:.0f}", f"{total['cpu_s']:.0f}"])
    held = sum(v.get("holds") == "yes" for v in verdicts.values())
    doc = {
        "title": "The paper's experiments on the simulated world: summary",
        "claim": None,
        "protocol": f"All experiments on the {h.options.preset} world (seed "
        f"{h.options.world_seed}), {len(h.seeds)} training seed(s), the budget below; "
        "times include shared work (world, features, models) done by the first experiment "
        "that needs it; wall time (longer when other jobs share the machine) and CPU time "
        "of this process.",
        "tables": [
            {
                "title": "verdicts and time per experiment",
                "columns": ["experiment", "paper's direction holds", "wall s", "CPU s"],
                "rows": rows,
            }
        ],
        "figures": [],
        "verdict": {
            "holds": f"{held} of {len(verdicts)}",
            "text": "; ".join(f"{n}: {v.get('holds', '?')}" for n, v in verdicts.items()),
        },
        "results": {"timings": timings, "total": total},
    }
    h.finish(NAME, doc, timer)
    report = write_report(h.root)
    h.console.print(f"report: {report.markdown} and {report.html}")
    return doc
