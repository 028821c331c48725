"""A tiny *random* run directory for exercising the endpoint without training anything.

``build_demo_run(cfg, directory)`` writes what the serving code loads from a real run:

* ``finetuned/``: a randomly initialised model of ``cfg.model``'s shape (real HF class,
  ``EarlyExitModel.save_pretrained``: weights + ``greencode_exits.json``) and a byte-level
  BPE tokenizer (``greencode.data.tokenizer.train_bpe``) trained on a few standard-library
  Python files turned into CodeXGLUE token text;
* ``agent/policy.pt``: an exported exit policy (``greencode.rl.policy.save_policy``) whose
  weights are zero and whose exit logit bias makes P(exit) = ``p_exit`` at every exit point
  and every token. With ``p_exit=0.7`` a request with threshold <= 0.7 exits at the first exit
  layer on every decode step and one with threshold > 0.7 runs the full depth, which makes
  the threshold plumbing testable exactly.

Completions from it are gibberish: it checks the serving path, never quality.
"""

from __future__ import annotations

import logging
import math
import sysconfig
from pathlib import Path
from typing import Union

from greencode.data.lexers import source_to_text
from greencode.data.tokenizer import train_bpe
from greencode.models import EarlyExitModel
from greencode.rl.policy import ExitPolicy, save_policy
from greencode.utils import set_seed

log = logging.getLogger(__name__)

_TRAIN_MODULES = ("json/__init__.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "string.py",
                  "bisect.py", "heapq.py", "shlex.py")


def _training_texts(language: str) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for rel in _TRAIN_MODULES:
        p = stdlib / rel
        if p.is_file():
            src = p.read_text(encoding="utf-8", errors="replace")
            try:
                texts.append(source_to_text(src, "python", "normalized", lenient=True))
            except Exception:  # noqa: BLE001 - any lexer problem: use the file as is
                texts.append(src)
    if not texts:  # a Python without its sources: still give the trainer something real-looking
        texts = ["def f ( x ) : <EOL> return x + <NUM_LIT> <EOL> class A : <EOL> pass"] * 50
    return texts


def build_demo_run(cfg, directory: Union[str, Path], *, p_exit: float = 0.7, fim: bool = False) -> Path:
    """Write a tiny random run (model, tokenizer, constant exit policy) into ``directory``; with
    ``fim`` (or ``tokenizer.fim_tokens``) the tokenizer has the fill-in-the-middle sentinels, so the
    endpoint serves FIM prompts in the model's own format."""
    import torch

    if not 0.0 < p_exit < 1.0:
        raise ValueError(f"p_exit={p_exit} must be strictly between 0 and 1")
    root = Path(directory)
    finetuned = root / "finetuned"
    finetuned.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    tok = train_bpe(_training_texts(cfg.data.language), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency,
                    fim_tokens=fim or cfg.tokenizer.fim_tokens)
    model = EarlyExitModel.from_config(cfg.model, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(finetuned)
    tok.save_pretrained(str(finetuned))
    meta = {"observation": cfg.rl.observation, "exit_layers": list(model.exit_layers),
            "fingerprint": model.fingerprint(), "note": f"demo policy: constant P(exit)={p_exit}, not trained"}
    policy = ExitPolicy(model.hidden_size, cfg.rl.ppo.net_arch, "tanh", meta)
    with torch.no_grad():
        for prm in policy.parameters():
            prm.zero_()
        policy.action_net.bias[1] = math.log(p_exit / (1.0 - p_exit))
    save_policy(policy, root / "agent" / "policy.pt")
    log.info("demo run (random weights, constant P(exit)=%.2f) written to %s", p_exit, root)
    return root


def ensure_demo_run(cfg, directory) -> str:
    """``directory`` as a servable run: build the tiny random demo run there unless it has one."""
    from pathlib import Path

    if not (Path(directory) / "finetuned" / "config.json").is_file():
        build_demo_run(cfg, directory)
    return str(directory)
