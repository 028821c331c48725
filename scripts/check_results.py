#!/usr/bin/env python
"""Check that every committed result of a run names the same weights (one base behind every result).

    python scripts/check_results.py                                   # results/default, figures/default,
                                                                      # results/benchmark/*default*
    python scripts/check_results.py --name smoke --no-expected-base   # another run; majority as reference
    python scripts/check_results.py --root /path/to/clone -v          # another checkout; list every file

Every result file records the fingerprint of the weights it came from (``weights``: base and
fine-tuned; greencode.provenance). This walks ``results/<name>/`` (every JSON),
``results/benchmark/*<name>*.json`` and ``figures/<name>/`` (each image through the inputs and
weights its ``index.json`` records) and exits 1, naming each file, when a file has no weights record,
names several, or names other weights than the reference. The reference base is the config's
shipped base (``model.base`` of ``configs/<name>.yaml``, when it is a local directory) unless
``--no-expected-base``; then the majority. ``results/archive/`` is exempt. Exit 0 when all agree.
"""

import argparse
import sys
from pathlib import Path

from greencode.cli import friendly_errors
from greencode.utils import REPO_ROOT


def expected_base(root: Path, name: str):
    """The fingerprint of the config's base model directory, or None (no config, or a hub id)."""
    from greencode.config import load_config
    from greencode.training.common import model_dir_fingerprint

    cfg_path = root / "configs" / f"{name}.yaml"
    if not cfg_path.is_file():
        return None
    base = load_config(cfg_path).model.base
    if not base:
        return None
    d = Path(base) if Path(base).is_absolute() else root / base
    return model_dir_fingerprint(str(d)) if d.is_dir() else None


@friendly_errors
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO_ROOT, help="the checkout to check (default: this one)")
    p.add_argument("--name", default="default", help="the run: results/<name>, figures/<name> (default: default)")
    p.add_argument("--no-expected-base", action="store_true",
                   help="take the majority's weights as the reference instead of the config's shipped base")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every file and the weights it names")
    args = p.parse_args()
    from greencode.provenance import check_results, identity_of

    expected = None if args.no_expected_base else expected_base(args.root, args.name)
    report = check_results(args.root, args.name, expected_base=expected)
    if args.verbose:
        for f in report.files:
            named = "; ".join(f"base {b}, fine-tuned {ft}" for b, ft in map(identity_of, f.records)) or "nothing"
            print(f"{f.path}: {named}")
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
