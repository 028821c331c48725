"""Shared command-line handling for the thin scripts in ``scripts/``."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Callable, Optional

from greencode.config import Config, ConfigError, load_config
from greencode.utils import setup_logging


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides, e.g. model.num_layers=4 eval.num_samples=10")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def load_from_args(args: argparse.Namespace) -> Config:
    setup_logging(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    return load_config(args.config, args.overrides)


def named_model_dirs(items, flag: str, example: str) -> dict[str, str]:
    """``NAME=DIR`` arguments (``--base``, ``--model``) as ``{name: dir}``; each DIR must be an HF model
    directory (its config.json there), else a clear error that names the argument and the fix."""
    from pathlib import Path

    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r} must look like NAME=DIR (e.g. {example})")
        name, d = item.split("=", 1)
        if not (Path(d) / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {name}={d}: no HF model there (config.json missing); pretrain it with "
                                    "scripts/pretrain.py (or fine-tune it) or point at a model directory")
        out[name] = d
    return out


def friendly_errors(fn: Callable[..., Optional[int]]) -> Callable[..., int]:
    """Turn expected user errors into one clear line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw) -> int:
        try:
            rc = fn(*a, **kw)
            return 0 if rc is None else rc
        except (ConfigError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapper
