"""The tables of docs/quality.md from the runs of scripts/quality_run.sh: per run, and NF4 seeds as mean ± spread.

    python scripts/quality_table.py runs/quality
"""

import json
import statistics
import sys
from pathlib import Path

COLUMNS = [("mae", "MAE $", "{:.1f}"), ("rmsle", "RMSLE", "{:.3f}"), ("hit_rate", "hits", "{:.1%}"),
           ("pearson", "Pearson", "{:.2f}"), ("distinct", "distinct", "{:.0f}")]


def row_of(task: dict) -> list[float | None]:
    return [task.get(key) for key, _, _ in COLUMNS]


def fmt(values: list[float | None], spread: bool) -> list[str]:
    cells = []
    for (_, _, f), v in zip(COLUMNS, zip(*values) if spread else [[x] for x in values]):
        v = [x for x in v if x is not None]
        if not v:
            cells.append("n/a")
        elif spread and len(v) > 1:
            cells.append(f"{f.format(statistics.mean(v))} ± {f.format((max(v) - min(v)) / 2)}")
        else:
            cells.append(f.format(v[0]))
    return cells


def main(root: Path) -> None:
    reports = {p.parent.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/eval/report.json"))}
    if not reports:
        sys.exit(f"error: {root}: no */eval/report.json; run scripts/quality_run.sh first")
    head = ["run", "model", "eval loss", *(name for _, name, _ in COLUMNS)]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for run, r in reports.items():
        print(f"| {run} | constant ${r['baseline']['answer']:.2f} | | " + " | ".join(fmt(row_of(r['baseline']['task']), False)) + " |")
        for name in ("base", "adapter"):
            print(f"| {run} | {name} | {r[name]['loss']:.4f} | " + " | ".join(fmt(row_of(r[name]['task']), False)) + " |")
    nf4 = [r for run, r in reports.items() if run.startswith("nf4-")]
    print(f"\nNF4 over {len(nf4)} seeds (mean ± half range):")
    print("| model | eval loss | " + " | ".join(name for _, name, _ in COLUMNS) + " |\n|" + " --- |" * (len(COLUMNS) + 2))
    for name in ("base", "adapter"):
        losses = [r[name]["loss"] for r in nf4]
        loss = f"{statistics.mean(losses):.4f} ± {(max(losses) - min(losses)) / 2:.4f}"
        print(f"| {name} | {loss} | " + " | ".join(fmt([row_of(r[name]["task"]) for r in nf4], True)) + " |")
    for run, r_bf16 in reports.items():  # each bf16-sN beside nf4-sN: the same recipe and seed
        r_nf4 = reports.get(run.replace("bf16-", "nf4-", 1)) if run.startswith("bf16-") else None
        if r_nf4 is None:
            continue
        a, b = r_nf4["adapter"]["loss"], r_bf16["adapter"]["loss"]
        print(f"\nNF4 vs bf16 ({run[len('bf16-'):]}): eval loss {a:.4f} vs {b:.4f} ({(a - b) / b:+.2%}); "
              f"MAE ${r_nf4['adapter']['task']['mae']:.1f} vs ${r_bf16['adapter']['task']['mae']:.1f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quality"))
