"""Where each stage of a run keeps its outputs. One place, so every stage agrees.

``runs/<name>/`` holds large intermediate artifacts (git-ignored): models, bank, agent.
``results/<name>/`` holds the committed, small result files; ``figures/<name>/`` the plots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from greencode.config import Config
from greencode.utils import REPO_ROOT


def _abs(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else REPO_ROOT / path


@dataclass(frozen=True)
class RunPaths:
    root: Path  # runs/<name>
    results: Path  # results/<name>
    figures: Path  # figures/<name>

    @classmethod
    def from_config(cls, cfg: Config) -> "RunPaths":
        return cls(root=_abs(cfg.run_dir), results=_abs(cfg.results_dir), figures=_abs(cfg.figures_dir))

    # stage outputs (directories)
    @property
    def corpus(self) -> Path:  # datasets.DatasetDict on disk + manifest.json
        return self.root / "corpus"

    @property
    def tokenizer(self) -> Path:  # AutoTokenizer.from_pretrained(dir) works
        return self.root / "tokenizer"

    @property
    def base_model(self) -> Path:  # HF model dir + tokenizer (pretrained base, all layers)
        return self.root / "base_model"

    @property
    def finetuned(self) -> Path:  # HF model dir + tokenizer + greencode_exits.json (LITE)
        return self.root / "finetuned"

    @property
    def bank(self) -> Path:  # trajectory bank (tensors + manifest.json)
        return self.root / "bank"

    @property
    def agent(self) -> Path:  # SB3 run dir: checkpoints, monitor, logs, policy.pt export
        return self.root / "agent"

    @property
    def policy(self) -> Path:  # exported plain-torch policy
        return self.agent / "policy.pt"

    @property
    def classifier(self) -> Path:  # the supervised exit classifier (same shape as the policy)
        return self.agent / "classifier.pt"

    @property
    def calibration(self) -> Path:  # thresholds calibrated on the validation split
        return self.results / "calibration" / "calibration.json"

    def variant_run(self, suffix: str, k: int, shared: tuple[str, ...]) -> Path:
        """``runs/<name>-<suffix>/<k>``: the run folder of variant ``k`` of a sweep or ablation, with
        the named stage outputs of this run (``corpus``, ``tokenizer``, ``finetuned``...) linked in,
        so each variant reruns only what it changes."""
        run_dir = self.root.with_name(f"{self.root.name}-{suffix}") / str(k)
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in shared:
            link = run_dir / name
            if not link.exists():
                os.symlink(getattr(self, name), link)
        return run_dir

    # results (small, committed)
    @property
    def results_pretrain(self) -> Path:
        return self.results / "pretrain"

    @property
    def results_finetune(self) -> Path:
        return self.results / "finetune"

    @property
    def results_rl(self) -> Path:
        return self.results / "rl"

    @property
    def results_eval(self) -> Path:
        return self.results / "eval"
