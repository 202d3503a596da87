"""What every table and figure of a run's outputs shares: the arms' order, labels and colours, the
paper's RM names, markdown tables, strict JSON and a headless matplotlib."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from apo_ray.core.arms import ARM_TABLE

# Order, labels and colours of the arms come from the table of RM update modes.
ARM_ORDER = tuple(ARM_TABLE)
ARM_LABELS = {name: mode.label for name, mode in ARM_TABLE.items()}
ARM_COLORS = {"base": "black", **{name: mode.colour for name, mode in ARM_TABLE.items()}}
MISSING = "–"
_RM_ID = re.compile(r"^rm/(?P<lineage>[^/]+)/r(?P<round>\d+)$")



def arm_label(arm: str) -> str:
    return ARM_LABELS.get(arm, arm)


def jsonable(x: Any) -> Any:
    """NaN / inf -> None, recursively, so report.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def format_markdown_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; None -> empty cell, ``|`` and newlines in cells are escaped.

    Rows shorter than the header are padded with empty cells.
    """
    def cell(v: Any) -> str:
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

    headers = [cell(h) for h in headers]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        cells = [cell(v) for v in row]
        cells += [""] * (len(headers) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rm_display_name(record: Mapping[str, Any]) -> str:
    """The paper's name for the record's RM: RM_Base, RM_APO-v1, RM_APO-v2seq, RM_Base-AB(v1).

    Read from the RM id (``rm/base``, ``rm/<lineage>/r<k>``; apo_seq's round-1 RM is ``rm/apo/r1``,
    i.e. RM_APO-v1) and, without a usable id, from the arm and round; the names are the modes'
    (``arms.ARM_TABLE``).
    """
    rm_id = str(record.get("rm") or "")
    if rm_id == "rm/base":
        return "RM_Base"
    m = _RM_ID.match(rm_id)
    if m:
        lineage, k = m["lineage"], int(m["round"])
    elif rm_id:
        return rm_id.replace("rm/", "RM_", 1) if rm_id.startswith("rm/") else rm_id
    else:
        lineage, k = str(record.get("rm_mode", "")), int(record.get("round", 0) or 0)
    mode = ARM_TABLE.get(lineage)
    if mode is None:
        return "RM_Base" if k == 0 else f"RM_{lineage}-v{k}"
    return mode.rm_display_name(k)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
