"""report.md's "Routing" section: which expert each val domain routes to (a moe_router run's routing.json)."""

from __future__ import annotations

import json
from pathlib import Path

from ftkit.rundir import ROUTING


def routing_section(run_dir: Path) -> str:
    """The section, or "" when the run has no routing.json."""
    path = Path(run_dir) / ROUTING
    if not path.is_file():
        return ""
    routing = json.loads(path.read_text())
    n = int(routing["experts"])
    before, after = routing.get("before") or {}, routing.get("after") or {}
    header = ["domain", "val rows", *(f"expert {e}" for e in range(n)), "top expert"]
    lines = [
        "\n## Routing\n",
        "Per val domain (a row's `domain` column, else its data file): the share of tokens (every layer, "
        "every non-padding val token) whose router ranks each expert first, after training; before training "
        "in brackets. Details, with mean router probabilities: routing.json.\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for domain, figures in after.items():
        old = before.get(domain)
        cells = [
            f"{share:.1%}" + (f" ({old['share'][e]:.1%})" if old else "") for e, share in enumerate(figures["share"])
        ]
        top = str(figures["top_expert"]) + (f" (was {old['top_expert']})" if old else "")
        lines.append("| " + " | ".join([domain, str(figures["rows"]), *cells, top]) + " |")
    return "\n".join(lines) + "\n"
