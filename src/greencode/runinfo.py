"""What every result and run folder records about its run: config, seed, commit, versions, hardware, command,
time, and the weights it came from (:mod:`greencode.provenance`). Above :mod:`greencode.utils` (which it uses)
and :mod:`greencode.provenance` (which it asks for the weights), so neither of those imports the other's floor."""

from __future__ import annotations

import datetime as _dt
import logging
import sys
from pathlib import Path
from typing import Any, Union

from greencode.config import dump_config
from greencode.provenance import weights_for_run
from greencode.utils import git_commit, hardware_info, library_versions, write_json, write_text

log = logging.getLogger("greencode")


def run_metadata(cfg=None, **extra: Any) -> dict[str, Any]:
    """What every result records: config, seed, commit, versions, hardware, command, time, and the
    weights it came from (``weights``: :func:`greencode.provenance.weights_record`).

    A writer that loaded its models passes ``weights=weights_record(model, ...)`` (computed once per
    run, from the directories actually loaded); without it, a config's run is described by its models
    on disk now (:func:`greencode.provenance.weights_for_run`). ``weights=None`` records none."""
    if "weights" not in extra and cfg is not None:
        try:
            extra["weights"] = weights_for_run(cfg)
        except Exception as e:  # noqa: BLE001 - the record never fails the result it describes
            log.warning("no weights record for this result: %s: %s", type(e).__name__, e)
    if extra.get("weights", True) is None:
        extra.pop("weights")
    meta: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "git_commit": git_commit(),
        "versions": library_versions(),
        "hardware": hardware_info(),
    }
    if cfg is not None:
        meta["config_name"] = cfg.name
        meta["config_path"] = cfg.source_path
        meta["seed"] = cfg.seed
        meta["config"] = cfg.to_dict()
    meta.update(extra)
    return meta


def save_run_info(directory: Union[str, Path], cfg, stage: str, **extra) -> None:
    """Every run folder holds the resolved config, the command line and the commit."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text(directory / "config.yaml", dump_config(cfg))
    meta = run_metadata(cfg, stage=stage, **extra)
    meta.pop("config", None)
    write_json(directory / "run_info.json", meta)
    write_text(directory / "command.txt", " ".join(sys.argv) + "\n")
