"""CodeXGLUE token-level code completion from the Hugging Face hub.

``google/code_x_glue_cc_code_completion_token``, configs ``java`` (JavaCorpus: train /
validation / test) and ``python`` (PY150: train / test; a validation split is carved
from train by a hash of the file path, ``data.validation_fraction`` of it). Records get
the corpus schema ``{id, path, code, num_tokens, language}``; Java records have no path,
so theirs is ``java/<split>/<id>``.

Without network the loader fails at once (no retry loop) with a message that says how to
use a local corpus instead; a copy already in the HF cache is still used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from greencode.config import ConfigError
from greencode.data.local import corpus_features, split_of

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0


class HubUnavailableError(ConfigError, ConnectionError):
    """The hub cannot be reached and the dataset is not in the local cache."""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """True when the environment asks for offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    if _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        return True
    try:
        import huggingface_hub.constants as hc

        return bool(hc.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - old huggingface_hub
        return False


def _unavailable_message(hub_id: str, language: str, why: str, offline: bool) -> str:
    ext = ".py" if language == "python" else ".java"
    default = "this interpreter's standard library" if language == "python" else "the JDK's lib/src.zip"
    cache_hint = "" if offline else " If the dataset is already in your HF cache, set HF_HUB_OFFLINE=1 to use it."
    return (f"cannot load {hub_id!r} (config {language!r}) from the Hugging Face hub: {why}. "
            f"Without network, build the same token format from local source files: set data.source=local and "
            f"data.local_path=<a directory or .zip of {ext} files> (null = {default}), e.g. "
            f"`python scripts/prepare_data.py --config <cfg> data.source=local data.local_path=/path/to/src`."
            + cache_hint)


@contextlib.contextmanager
def _forced_offline() -> Iterator[None]:
    """Make datasets / huggingface_hub read only from the cache for the duration."""
    from unittest import mock

    import datasets
    import huggingface_hub.constants as hc

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(hc, "HF_HUB_OFFLINE", True))
        if hasattr(datasets.config, "HF_HUB_OFFLINE"):
            stack.enter_context(mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True))
        if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
            stack.enter_context(mock.patch.object(datasets.config, "HF_DATASETS_OFFLINE", True))
        yield


def _probe(hub_id: str) -> str | None:
    """None when the hub answers for ``hub_id``; otherwise why not. Raises ConfigError
    when the hub answers that the dataset does not exist."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - datasets depends on huggingface_hub
        return f"huggingface_hub is not importable ({e})"
    try:
        HfApi().dataset_info(hub_id, timeout=PROBE_TIMEOUT_S)
        return None
    except RepositoryNotFoundError as e:
        raise ConfigError(f"data.hub_id={hub_id!r} is not a dataset on the hub ({e.__class__.__name__}); use "
                          "google/code_x_glue_cc_code_completion_token") from e
    except Exception as e:  # noqa: BLE001 - connection errors come from several libraries
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()


def _load_raw(hub_id: str, language: str, offline: bool):
    import datasets

    ctx = _forced_offline() if offline else contextlib.nullcontext()
    with ctx:
        try:
            return datasets.load_dataset(hub_id, language)
        except Exception as e:  # noqa: BLE001
            if "script" not in str(e).lower():
                raise
            # the repository still holds a loading script (unsupported by datasets >= 4):
            # the hub's automatic parquet conversion has the same data
            log.info("%s has a loading script; using its parquet conversion (refs/convert/parquet)", hub_id)
            return datasets.load_dataset(hub_id, language, revision="refs/convert/parquet")


def load_hub_corpus(cfg) -> "datasets.DatasetDict":
    """CodeXGLUE token-level completion as a DatasetDict with train / validation / test
    in the corpus schema. ``data.max_files`` keeps the first N records of each split."""
    import datasets

    d = cfg.data
    offline = hub_offline()
    why = None if offline else _probe(d.hub_id)
    try:
        if offline or why is not None:
            raw = _load_raw(d.hub_id, d.language, offline=True)  # the cache, or fail at once
            if why is not None:
                log.warning("hub unreachable (%s); using the cached copy of %s", why, d.hub_id)
        else:
            raw = _load_raw(d.hub_id, d.language, offline=False)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        reason = why or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if offline and why is None:
            reason = f"offline mode is set and the dataset is not in the cache ({reason})"
        raise HubUnavailableError(_unavailable_message(d.hub_id, d.language, reason, offline)) from e

    missing = {"train", "test"} - set(raw)
    if missing:
        raise ValueError(f"{d.hub_id} ({d.language}) has splits {sorted(raw)}; expected train and test")
    out: dict[str, Any] = {}
    for split in ("train", "validation", "test"):
        if split in raw:
            out[split] = _standardize(raw[split], split, d.language)
    if "validation" not in out:  # PY150: carve validation from train by path hash
        train = out["train"]
        is_val = [split_of(p, d.validation_fraction, 0.0) == "validation" for p in train["path"]]
        val_idx = [i for i, v in enumerate(is_val) if v]
        train_idx = [i for i, v in enumerate(is_val) if not v]
        out["validation"] = train.select(val_idx)
        out["train"] = train.select(train_idx)
        log.info("carved %d validation records from %d train records (validation_fraction=%s)", len(val_idx),
                 len(is_val), d.validation_fraction)
    if d.max_files is not None:
        out = {k: v.select(range(min(d.max_files, len(v)))) for k, v in out.items()}
    return datasets.DatasetDict({k: out[k] for k in ("train", "validation", "test")})


def _standardize(ds, split: str, language: str):

    has_path = "path" in ds.column_names

    def fn(batch: dict) -> dict:
        ids = [str(i) for i in batch["id"]]
        paths = [p.strip() for p in batch["path"]] if has_path else [f"{language}/{split}/{i}" for i in ids]
        codes = batch["code"]
        return {"id": ids, "path": paths, "code": codes, "num_tokens": [max(0, len(c) - 2) for c in codes],
                "language": [language] * len(ids)}

    return ds.map(fn, batched=True, remove_columns=ds.column_names, features=corpus_features(),
                  desc=f"standardize {split}")
