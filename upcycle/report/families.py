"""The table of dense families upcycle converts (`upcycle inspect --families`, README), built from the
family JSON tables, so a family added there shows up here without a line of code."""

from __future__ import annotations

from typing import Any

from ..arch import Family, families

COLUMNS = ("family", "targets", "auto: every layer / some layers", "exact", "caveats")


def exactness(family: Family) -> str:
    """Every listed target is exact by construction; a value rewritten in float32 stays exact only there."""
    if any(rule.get("in", "float32") == "float32" and "add" in rule for rule in family.transforms):
        return "float32 (bf16/fp16: close, not equal)"
    return "yes"


def family_rows() -> list[dict[str, Any]]:
    rows = []
    for fam in sorted(families().values(), key=lambda f: f.name):
        if fam.auto_target:
            auto = f"{fam.auto_target['every_layer']} / {fam.auto_target['some_layers']}"
        else:  # no native class holds the family exactly: upcycle's own wrapper (needs trust_remote_code elsewhere)
            auto = "generic / generic"
        names = sorted(fam.targets) + (["generic"] if fam.mlp else [])
        rows.append(
            {
                "family": fam.name,
                "targets": ", ".join(names),
                "auto: every layer / some layers": auto,
                "exact": exactness(fam),
                "caveats": fam.caveats or "–",
            }
        )
    return rows


def family_markdown() -> str:
    """The table as Markdown, as the README holds it."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in family_rows():
        lines.append("| " + " | ".join(str(row[c]).replace("|", "\\|") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"
