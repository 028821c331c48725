"""Completions a person can read: a seeded handful of evaluation samples shown as the
context's last lines, the reference, the full model's completion and GC's.

Written by the evaluator as ``results/<name>/eval/completions.md``; the samples are drawn
with ``random.Random(seed)`` from the evaluated ones, never picked by hand.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

from greencode.utils import read_json, write_text


def pick_gc(method_ids: Sequence[str]) -> Optional[str]:
    """The middle GC threshold (the evaluation's own knob range), else None."""
    gc = sorted((m for m in method_ids if m.startswith("gc@")), key=lambda m: float(m.split("@", 1)[1]))
    return gc[len(gc) // 2] if gc else None


def _tail(text: str, lines: int = 4, chars: int = 400) -> str:
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def _fence(text: str) -> str:
    return "```python\n" + text.replace("```", "`\u200b``") + "\n```"


def write_completions(eval_dir: Path, samples: Sequence, *, count: int = 10, seed: int = 0,
                      gc_id: Optional[str] = None) -> Optional[Path]:
    """``completions.md`` for ``count`` seeded samples; None when ``full`` was not evaluated."""
    eval_dir = Path(eval_dir)
    methods = eval_dir / "methods"
    if not (methods / "full.json").is_file():
        return None
    ids = [p.stem for p in methods.glob("*.json")]
    gc_id = gc_id or pick_gc(ids)
    full = {r["index"]: r for r in read_json(methods / "full.json")["records"]}
    gc = {r["index"]: r for r in read_json(methods / f"{gc_id}.json")["records"]} if gc_id else {}
    pool = sorted(full)
    chosen = sorted(random.Random(seed).sample(pool, min(count, len(pool))))
    lines = [f"# {len(chosen)} completions from the evaluation split", "",
             f"Samples drawn with `random.Random({seed})` from the {len(pool)} evaluated ones (not picked by hand). "
             f"Each shows the last lines of the context, the reference continuation, the fine-tuned full model "
             f"(`full`) and GREEN-CODE (`{gc_id}`), {read_json(methods / 'full.json')['records'][0]['new_tokens']} "
             "tokens at most, greedy. Exit layers are 0-based.", ""]
    by_index = {i: s for i, s in enumerate(samples)}
    for n, i in enumerate(chosen, 1):
        s = by_index.get(i)
        ctx = getattr(s, "context_text", "") if s is not None else ""
        lines += [f"## {n}. `{getattr(s, 'path', '?')}` (sample {i})", "", "Context (tail):", "",
                  _fence(_tail(ctx)), "", "Reference:", "", _fence(full[i]["reference"]), "",
                  "Full model:", "", _fence(full[i]["prediction"]), ""]
        if i in gc:
            g = gc[i]
            exits = g.get("exit_layers") or []
            mean = sum(exits[1:]) / len(exits[1:]) if len(exits) > 1 else None
            lines += [f"GC (`{gc_id}`, mean exit layer {mean:.1f}):" if mean is not None else f"GC (`{gc_id}`):", "",
                      _fence(g["prediction"]), ""]
    out = eval_dir / "completions.md"
    write_text(out, "\n".join(lines))
    return out
