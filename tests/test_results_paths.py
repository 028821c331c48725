"""Committed results name paths relative to the repository or the run, never this machine's."""

import subprocess

from greencode.utils import MACHINE_PATH, REPO_ROOT, portable_path, scrub_paths, write_json

TEXT = (".json", ".md", ".csv", ".txt", ".py", ".yaml", ".log")


def _committed_results() -> list:
    try:
        out = subprocess.run(["git", "ls-files", "results"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        files = [REPO_ROOT / f for f in out.stdout.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file under results/
        files = [p for p in (REPO_ROOT / "results").rglob("*") if p.is_file()]
    return [f for f in files if f.suffix in TEXT and f.is_file()]


def test_no_committed_result_holds_a_machine_path():
    files = _committed_results()
    assert len(files) > 50
    bad = {}
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        hits = MACHINE_PATH.findall(text) + ([str(REPO_ROOT)] if str(REPO_ROOT) in text else [])
        if hits:
            bad[str(f.relative_to(REPO_ROOT))] = hits[:3]
    assert not bad, f"absolute paths in committed results (write them with greencode.utils.write_json): {bad}"


def test_paths_are_made_portable():
    assert portable_path(REPO_ROOT / "runs" / "default" / "finetuned") == "runs/default/finetuned"
    assert portable_path("/tmp/fresh-clone/runs/default/agent/policy.pt") == "runs/default/agent/policy.pt"
    assert portable_path("/home/someone/scratch.py") == "<outside>/scratch.py"
    assert portable_path("runs/default") == "runs/default"
    text = f'model {REPO_ROOT}/runs/default/finetuned, "/tmp/demo4/results/x.json", route /v1/completions, 3/4'
    assert scrub_paths(text) == 'model runs/default/finetuned, "results/x.json", route /v1/completions, 3/4'


def test_only_files_under_results_are_scrubbed(tmp_path):
    out = write_json(tmp_path / "a.json", {"path": "/tmp/somewhere/runs/default"})
    assert "/tmp/somewhere/runs/default" in out.read_text()  # a run's own files keep what they say
