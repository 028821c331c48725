"""scripts/plot.py end to end on a small results folder (and its errors)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from greencode.utils import REPO_ROOT

sys.path.insert(0, str(Path(__file__).parent))
from test_plots_figures import write_eval  # noqa: E402  (the synthetic writers of the figure tests)

SCRIPT = REPO_ROOT / "scripts" / "plot.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT)


def test_plot_script_writes_figures_and_reports_skips(tmp_path):
    results = tmp_path / "results" / "tiny"
    write_eval(results, methods=["full", "fixed@2", "gc@0.9"], n=2)
    out = _run("--results", str(results))
    assert out.returncode == 0, out.stderr
    figures = tmp_path / "figures" / "tiny"  # derived from results/<name>
    index = json.loads((figures / "index.json").read_text())
    assert {"fixed_exits", "pareto", "cost_by_method", "accuracy_by_method", "agent_overhead",
            "lite_weights"} <= set(index["figures"])
    assert "ppo_reward" in index["skipped"]
    for name in index["figures"].values():
        assert all((figures / f).stat().st_size > 1000 for f in name)
    assert "skipped:" in out.stdout and "ppo_reward" in out.stdout


def test_plot_script_missing_results_is_a_clear_error(tmp_path):
    out = _run("--results", str(tmp_path / "results" / "nope"))
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr



def test_plot_script_refuses_a_bad_format_or_dpi(tmp_path):
    results = tmp_path / "results" / "tiny"
    write_eval(results, methods=["full", "fixed@2"], n=2)
    bad = _run("--results", str(results), "--formats", "jpg")
    assert bad.returncode == 2 and "invalid choice: 'jpg'" in bad.stderr
    bad = _run("--results", str(results), "--dpi", "5")
    assert bad.returncode == 2 and "figures.dpi=5 is out of range" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "figures").exists()
