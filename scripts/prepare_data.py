"""Build (or reuse) the corpus and the tokenizer of a config.

Tiny CPU run (seconds; 30 files of this interpreter's standard library):
    python scripts/prepare_data.py --config configs/smoke.yaml data.max_files=30 run_dir=/tmp/gc_smoke

Full embedded default (the whole standard library, < 1 min on 2 cores):
    python scripts/prepare_data.py --config configs/default.yaml

Writes runs/<name>/corpus (datasets DatasetDict + manifest.json) and runs/<name>/tokenizer
(AutoTokenizer.from_pretrained works on it). Inputs unchanged -> both are reused; --force
rebuilds them.
"""

from __future__ import annotations

import sys
import time

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.data import prepare_data, read_manifest


@friendly_errors
def main(argv=None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="rebuild the corpus and the tokenizer even if unchanged")
    args = p.parse_args(argv)
    cfg = load_from_args(args)
    t0 = time.perf_counter()
    corpus_dir, tok_dir = prepare_data(cfg, force=args.force)
    m = read_manifest(corpus_dir) or {}
    print(f"corpus    {corpus_dir}")
    print(f"  source  {m.get('source')}: {m.get('source_path')} ({m.get('language')}, literals {m.get('literal_mode')})")
    files = m.get("files", {})
    if "found" in files:
        skipped = ", ".join(f"{k} {v}" for k, v in files.get("skipped", {}).items()) or "none"
        print(f"  files   found {files['found']}, seen {files['seen']}, used {files['used']}; skipped: {skipped}")
    for split, s in m.get("splits", {}).items():
        print(f"  {split:<10}{s['records']:>8} records {s['tokens']:>12,} tokens")
    print(f"  content {m.get('content_hash', '')[:16]}  built in {m.get('build_time_s', 0):.1f} s")
    print(f"tokenizer {tok_dir}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
