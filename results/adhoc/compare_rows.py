"""Row-by-row comparison of two evaluation summaries (a fresh clone's against the committed one): edit similarity,
compute ratio, agreement with the full model and median latency of every method both hold, as a markdown table.

    python3 results/adhoc/compare_rows.py FRESH/results/default/eval/summary.json results/default/eval/summary.json
"""
import json
import sys


def main(fresh: str, committed: str) -> None:
    a, b = (json.load(open(p)) for p in (fresh, committed))
    ra, rb = ({r["id"]: r for r in s["rows"]} for s in (a, b))
    hw = [s.get("run_metadata", {}).get("hardware", {}).get("processor") for s in (a, b)]
    # no machine paths in a committed rendering (tests/test_results_paths.py)
    print(f"fresh: a fresh clone's results/default/eval/summary.json ({hw[0]}); committed: "
          f"results/default/eval/summary.json ({hw[1]})\n")
    print("| method | edit sim. fresh | committed | Δ | compute fresh | committed | agreement fresh | committed | "
          "latency p50 fresh s | committed s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def f(r, k):
        v = r.get(k)
        return float("nan") if v is None else v

    for k in rb:
        if k not in ra:
            print(f"| `{k}` | (not in the fresh run) | | | | | | | | |")
            continue
        x, y = ra[k], rb[k]
        print(f"| `{k}` | {f(x, 'edit_similarity'):.2f} | {f(y, 'edit_similarity'):.2f} | "
              f"{f(x, 'edit_similarity') - f(y, 'edit_similarity'):+.2f} | {f(x, 'compute_ratio'):.3f} | "
              f"{f(y, 'compute_ratio'):.3f} | {f(x, 'same_output_as_reference_share'):.3f} | "
              f"{f(y, 'same_output_as_reference_share'):.3f} | {f(x, 'latency_s_median'):.3f} | "
              f"{f(y, 'latency_s_median'):.3f} |")
    for k in ra:
        if k not in rb:
            print(f"| `{k}` | (only in the fresh run) | | | | | | | | |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
