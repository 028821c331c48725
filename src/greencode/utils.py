"""Small shared helpers: seeding, device/dtype resolution, run metadata, atomic writes."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np


log = logging.getLogger("greencode")

REPO_ROOT = Path(__file__).resolve().parents[2]


def set_seed(seed: int) -> None:
    """The one seeding function: Python, NumPy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str = "auto") -> "torch.device":
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"hardware.device={name!r} but CUDA is not available on this machine; "
                           "use hardware.device=auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: "torch.device") -> "torch.dtype":
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def setup_torch(hardware) -> tuple["torch.device", "torch.dtype"]:
    import torch

    if hardware.num_threads:
        torch.set_num_threads(hardware.num_threads)
    device = resolve_device(hardware.device)
    return device, resolve_dtype(hardware.dtype, device)


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or None
        # result and figure files a run itself rewrites do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results",
                                ":!figures"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{commit}{'-dirty' if dirty and commit else ''}" if commit else None
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def library_versions() -> dict[str, Optional[str]]:
    names = ["torch", "transformers", "tokenizers", "datasets", "accelerate", "gymnasium", "stable-baselines3",
             "codebleu", "sacrebleu", "rouge-score", "zeus", "fastapi", "numpy"]
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one, else ``os.cpu_count()``.
    A sandbox or scheduler can pin a job to fewer cores than the machine has; torch follows the affinity."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def hardware_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),  # the cores this process may run on (CPU affinity)
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@contextlib.contextmanager
def torch_threads(num_threads: int):
    """Run a block with ``num_threads`` torch intra-op threads (restored afterwards).

    Used for the small models and MLPs of the RL stage on CPU: on a machine whose cores
    are busy, OpenMP threads waiting for each other made a 4-layer model's bank sequence
    65x slower with 2 threads than with 1 (2.3 s vs 0.035 s) and PPO 11x slower."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


_NUMPY_BLAS: Optional[list] = None  # NumPy's own OpenBLAS (threadpoolctl's controllers), found once
_BLAS_LOCK = threading.Lock()
_BLAS_DEPTH = 0  # numpy_blas_threads blocks open, in every thread
_BLAS_PREV: list = []  # the thread counts the first of them found


def _numpy_blas() -> list:
    global _NUMPY_BLAS
    if _NUMPY_BLAS is None:
        try:  # threadpoolctl comes with scikit-learn (requirements.txt)
            from threadpoolctl import ThreadpoolController

            # the BLAS bundled with NumPy's wheel (numpy.libs/, numpy/.dylibs/, ...), not SciPy's or torch's
            _NUMPY_BLAS = [c for c in ThreadpoolController().lib_controllers
                           if c.user_api == "blas" and "numpy" in Path(c.filepath).parent.as_posix()]
        except Exception:  # no threadpoolctl, or a BLAS it cannot drive: NumPy keeps its threads
            _NUMPY_BLAS = []
    return _NUMPY_BLAS


@contextlib.contextmanager
def numpy_blas_threads(num_threads: int):
    """Run a block with NumPy's own BLAS on ``num_threads`` threads (restored afterwards; torch's threads are
    untouched: it has its own OpenMP and BLAS).

    Used by the decoding loop's host checks (:class:`greencode.decoding.signals.HostCheck`): their products
    are a few rows of a few hundred columns, and OpenBLAS threads for them spin beside torch's OpenMP
    threads. Measured on the default at batch 8 on 2 cores (``results/adhoc/step_parts_batch.py``): with
    NumPy's 2 threads a GC step took 72.5 ms against 19.6 ms on the tensor path, the layers included
    (53.6 ms against 10.8 ms). Costs about 2 us per block. Blocks may overlap across threads: the first in sets
    the count, the last out restores it (OpenBLAS ignores a raise asked from a thread other than the main one, so
    after a block that ends last in such a thread, e.g. the endpoint's model thread, NumPy's BLAS stays on one
    thread in that process)."""
    libs = _numpy_blas()
    if not libs:
        yield
        return
    global _BLAS_DEPTH, _BLAS_PREV
    with _BLAS_LOCK:  # blocks in several threads at once (the endpoint's model thread beside another): the first
        if _BLAS_DEPTH == 0:  # in sets, the last out restores
            _BLAS_PREV = [c.num_threads for c in libs]
            for c in libs:
                c.set_num_threads(max(1, int(num_threads)))
        _BLAS_DEPTH += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_DEPTH -= 1
            if _BLAS_DEPTH == 0:
                for c, n in zip(libs, _BLAS_PREV):
                    c.set_num_threads(n)


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename over ``path`` only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create directory {str(path.parent)!r} for {path.name}: {e}; "
                      "choose a writable location") from e
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# absolute paths of this machine inside a result file: the repository itself, and the usual scratch and home roots
MACHINE_PATH = re.compile(r"(?<![\w.:/-])/(?:tmp|home|work|root|mnt|scratch|Users|var/folders|private)/[^\s\"'`,;|()\[\]{}<>]*")
PORTABLE_ROOTS = ("runs", "results", "figures", "assets", "configs", "src", "scripts", "tests")


def portable_path(path: Union[str, Path]) -> str:
    """``path`` as a result file should name it: relative to the repository when inside it; else from
    its last ``runs/``, ``results/``, ... component (another clone's run directory); else
    ``<outside>/<name>``. Result files carry no machine paths."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.resolve().relative_to(REPO_ROOT)) or "."
    except (ValueError, OSError):
        pass
    parts = p.parts
    for k in range(len(parts) - 1, 0, -1):
        if parts[k] in PORTABLE_ROOTS:
            return str(Path(*parts[k:]))
    return f"<outside>/{p.name}"


def scrub_paths(text: str) -> str:
    """Every absolute machine path in ``text`` replaced by its :func:`portable_path`."""
    text = text.replace(str(REPO_ROOT) + "/", "").replace(str(REPO_ROOT), ".")
    return MACHINE_PATH.sub(lambda m: portable_path(m.group(0)), text)


def _for_results(path: Union[str, Path], text: str) -> str:
    """Files written under ``results/`` are committed: their machine paths are made portable."""
    try:
        Path(path).resolve().relative_to(REPO_ROOT / "results")
    except ValueError:
        return text
    return scrub_paths(text)


def write_json(path: Union[str, Path], obj: Any) -> Path:
    """Write valid JSON atomically (temp file, then rename); under ``results/`` without machine paths."""
    text = _for_results(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_text(path: Union[str, Path], text: str) -> Path:
    text = _for_results(path, text)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Union[str, Path]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
