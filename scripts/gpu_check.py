"""The GPU box check in one command (make gpu-check): paper-shape (Llama-3.2-3B, OPT-2.7B)
random-initialised models in bf16, no downloads. Correctness against HF generate, latency per
token at batch 1 and 8 (HF dynamic cache, HF static cache + torch.compile, our loop: full,
fixed exits, a random policy), energy per token (Zeus, else NVML via nvidia-ml-py), and a few
LITE fine-tuning steps. Writes results/gpu/<gpu-name>.json and prints a summary.

Runs with the machine's own python (torch and transformers only; not through make setup):
    python3 scripts/gpu_check.py
Before going offline, fetch the NVML wheel it can carry (Zeus needs more than it can carry):
    pip download nvidia-ml-py==13.615.71 --no-deps -d vendor/
On a CPU, the same code path at toy sizes (what the test suite runs):
    python3 scripts/gpu_check.py --tiny --out /tmp/gpu-check-tiny.json
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

try:
    from greencode.bench.gpu import SHAPES, TOTAL_BUDGET_S, run_check, summary_lines  # noqa: E402
except ModuleNotFoundError as e:  # the machine's own python, without what the check needs
    if e.name not in ("torch", "transformers", "numpy", "yaml"):
        raise
    sys.exit(f"error: {sys.executable} has no {e.name!r}: the GPU check runs with the machine's own python, which "
             "needs torch and transformers (pip install torch transformers), or point make at one that has them: "
             "make gpu-check PYTHON=.venv/bin/python")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (the test suite's run; the compiled part on the first shape only)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    p.add_argument("--out", type=Path, default=None, help="result file (default results/gpu/<gpu-name>.json)")
    p.add_argument("--no-compile", action="store_true", help="skip HF's static cache + torch.compile baseline")
    p.add_argument("--energy-window", type=float, default=4.0, help="seconds of steady state per energy window")
    p.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S,
                   help="seconds for the whole check (parts with no time left are recorded as skipped)")
    args = p.parse_args()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here (torch.cuda.is_available() is False); the full check is for a GPU box "
                 "(it builds 3B-parameter models). On a CPU, run its code path at toy sizes: "
                 "python3 scripts/gpu_check.py --tiny --out /tmp/gpu-check-tiny.json")
    result = run_check(tiny=args.tiny, shapes=tuple(args.shapes), out=args.out, compile_hf=not args.no_compile,
                       energy_window_s=args.energy_window, total_budget_s=args.total_budget,
                       compiled_shapes=args.shapes[:1] if args.tiny else None)
    print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
