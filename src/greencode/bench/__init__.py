"""greencode.bench: every speed measurement, timed through one harness and written by one writer.

* ``timing.py``: the harness (clocks with device sync, interleaved rounds, quartiles and
  percentiles, the machine's noise) and the result writer (``write_result``, ``merge_result``:
  atomic JSON and its markdown table, with the run's metadata and weights record);
* ``common.py``: what the decoding benchmarks share (model and policy loading, prompts, HF's
  per-step clock, setup lines);
* ``decoding.py`` (seconds per token, lossless methods), ``throughput.py`` (tokens/s per batch
  size), ``compiled.py`` (compiled layer step vs eager): ``scripts/benchmark.py``;
* ``serving.py``: the endpoint over HTTP (latency, load, burst, lossless rows, chunked prefill,
  memory, editors' FIM bodies): ``scripts/bench_serve.py``;
* ``gpu.py``: ``make gpu-check`` (``scripts/gpu_check.py``).

Nothing is imported here: ``scripts/gpu_check.py`` runs ``gpu.py`` with the machine's own python
(torch and transformers only).
"""
