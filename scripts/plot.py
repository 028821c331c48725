#!/usr/bin/env python
"""Draw the figures of a run from its result files only (PNG at 150 dpi and PDF by default).

    python scripts/plot.py --results results/smoke                      # -> figures/smoke/
    python scripts/plot.py --results results/default --figures /tmp/figs
    python scripts/plot.py --results results/default --formats pdf      # PDF only (e.g. for a paper)
    python scripts/plot.py --config configs/smoke.yaml                  # results_dir, figures_dir and the
                                                                        # figures section of the config

Figures whose inputs are missing (e.g. no rl/ yet) are skipped with the reason printed and
recorded in <figures>/index.json; see greencode.plots for the list of figures.
"""

import argparse
import logging
import sys
from pathlib import Path

from greencode.cli import friendly_errors
from greencode.config import FIGURE_FORMATS, ConfigError, FiguresConfig, load_config
from greencode.utils import REPO_ROOT, read_json, setup_logging


def _default_figures(results: Path) -> Path:
    """figures/<name> next to results/<name> (results/<name> -> figures/<name>)."""
    results = results.resolve()
    if results.parent.name == "results":
        return results.parent.parent / "figures" / results.name
    return REPO_ROOT / "figures" / results.name


@friendly_errors
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", type=Path, help="a run's results folder, e.g. results/smoke")
    src.add_argument("--config", help="YAML config; its results_dir and figures_dir are used")
    p.add_argument("--figures", type=Path, default=None,
                   help="output folder (default: figures/<name> for results/<name>)")
    p.add_argument("--formats", nargs="+", choices=FIGURE_FORMATS, default=None,
                   help="file formats to write (default: the config's figures.formats, else png pdf)")
    p.add_argument("--dpi", type=int, default=None, help="PNG resolution (default: the config's figures.dpi, else 150)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides (with --config)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args()
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    if args.config:
        from greencode.paths import RunPaths

        cfg = load_config(args.config, args.overrides)
        paths = RunPaths.from_config(cfg)
        results, figures = paths.results, args.figures or paths.figures
        formats, dpi = cfg.figures.formats, cfg.figures.dpi
    else:
        if args.overrides:
            p.error("key=value overrides need --config")
        results = args.results
        figures = args.figures or _default_figures(results)
        default = FiguresConfig()
        formats, dpi = default.formats, default.dpi
    formats, dpi = args.formats or formats, args.dpi or dpi
    try:
        FiguresConfig(list(formats), dpi).validate("figures")
    except ConfigError as e:
        p.error(str(e))

    from greencode.plots import plot_all

    files = plot_all(results, figures, formats, dpi)
    index = read_json(Path(figures) / "index.json")
    print(f"{len(index['figures'])} figures ({len(files)} files) in {figures}:")
    for name, fs in index["figures"].items():
        print(f"  {name:<20} {', '.join(fs)}")
    for name, reason in index["skipped"].items():
        print(f"  {name:<20} skipped: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
