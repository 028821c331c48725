"""Compares two trajectory banks array by array (bitwise) and lists the manifest keys that differ.

Ad-hoc check kept with its result in results/LOG.md (2026-12-07: the 2-process simulated bank against the
one-process bank, every array equal). Run from the repo root:
    .venv/bin/python results/adhoc/compare_banks.py BANK_A BANK_B
"""
import json, sys, numpy as np
a, b = sys.argv[1], sys.argv[2]
for n in ("behaviour_exit", "heldout", "l_opt", "offsets", "preds", "tokens"):
    x, y = np.load(f"{a}/{n}.npy"), np.load(f"{b}/{n}.npy")
    print(n, x.shape, np.array_equal(x, y))
x, y = np.load(f"{a}/obs.npy", mmap_mode="r"), np.load(f"{b}/obs.npy", mmap_mode="r")
eq = all(np.array_equal(x[i:i+20000], y[i:i+20000]) for i in range(0, len(x), 20000))
print("obs", x.shape, eq)
ma, mb = json.load(open(f"{a}/manifest.json")), json.load(open(f"{b}/manifest.json"))
diff = [k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k)]
print("manifest keys differing:", diff, ma.get("build_seconds"), mb.get("build_seconds"))
