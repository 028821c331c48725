"""Print the README's results table from an evaluation summary (no hand-copied numbers).

    python scripts/readme_table.py results/default/eval
    python scripts/readme_table.py results/default/eval --hull   # controllers against the static hull

Columns: token agreement with the full model and the paired differences in edit similarity
and exact match (95% bootstrap intervals; * = the interval excludes zero), the share of the exact
matches on boilerplate references (licence headers, blank) and the exact-match difference without
them, corpus ROUGE-L, BLEU and CodeBLEU, the hardware-independent compute ratio and the timed latency.
Every row is on the same samples (n). With --hull: each controller against the convex hull of the static
exits at matched compute (edit similarity, token agreement, token risk; greencode.eval.hull), from the
summary's `hull` block, or computed from the folder when it has none.
"""

import argparse
import json
from pathlib import Path

from greencode.eval.hull import hull_of_eval_dir
from greencode.eval.summary import ci_cell, mean_cell


def _num(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _share(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def table(summary: dict) -> str:
    lines = ["| method | n | token agreement | Δ edit similarity | Δ exact match | EM on boilerplate | "
             "Δ EM w/o boilerplate | ROUGE-L | BLEU | CodeBLEU | compute vs full | latency s (timed n) | Δ latency |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lat = r.get("latency_s_delta_pct")
        lines.append(
            f"| `{r['id']}` | {r['num_samples']} | {mean_cell(r, 'token_agreement', 3)} | {ci_cell(r, 'edit_similarity', 1)} | "
            f"{ci_cell(r, 'exact_match', 3)} | {_share(r.get('exact_match_boilerplate_share'))} | "
            f"{ci_cell(r, 'exact_match_no_boilerplate', 3)} | {_num(r.get('rouge_l'), '.3f')} | {_num(r.get('bleu'), '.1f')} | "
            f"{_num(r.get('codebleu'), '.3f')} | {_num(r.get('compute_ratio'), '.2f')} | "
            f"{_num(r.get('latency_s'), '.3f')} ({r.get('timed_samples', '–')}) | "
            f"{'–' if lat is None else f'{lat:+.0f}%'} |")
    return "\n".join(lines)


def hull_table(block: dict, keys=("edit_similarity", "token_agreement", "token_risk")) -> str:
    """One line per controller: compute, then per metric the difference to the static hull at that compute
    (95% paired interval) and the verdict."""
    metrics = {k: block["metrics"][k] for k in keys if k in block.get("metrics", {})}
    names = {"edit_similarity": "edit similarity", "token_agreement": "token agreement", "token_risk": "token risk"}
    digits = {"edit_similarity": 2}
    lines = ["| method | compute | " + " | ".join(f"Δ {names.get(k, k)} vs hull" for k in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    ids = list(dict.fromkeys(e["id"] for res in metrics.values() for e in res["rows"]))
    for mid in ids:
        cells, compute = [], None
        for k, res in metrics.items():
            e = next((x for x in res["rows"] if x["id"] == mid), None)
            if e is None:
                cells.append("–")
                continue
            compute = e["compute"]
            if e.get("diff") is None:
                cells.append(e.get("verdict") or "–")
                continue
            n = digits.get(k, 3)
            ci = e.get("diff_ci")
            text = f"{e['diff']:+.{n}f}" + (f" [{ci[0]:+.{n}f}, {ci[1]:+.{n}f}]" if ci else "")
            cells.append(text + (f" {e['better']}" if e.get("better") in ("better", "worse") else ""))
        lines.append(f"| `{mid}` | {_num(compute, '.2f')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eval_dir", help="an evaluation folder, e.g. results/default/eval")
    p.add_argument("--hull", action="store_true", help="the controllers against the static hull instead")
    args = p.parse_args()
    path = Path(args.eval_dir) / "summary.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; run the evaluation first (scripts/evaluate.py)")
    summary = json.loads(path.read_text(encoding="utf-8"))
    if args.hull:
        print(hull_table(summary.get("hull") or hull_of_eval_dir(args.eval_dir)))
        return
    print(table(summary))


if __name__ == "__main__":
    main()
