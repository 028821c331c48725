"""Energy and time meters behind one interface: Zeus (GPU via NVML, CPU via RAPL) or time only.

Usage (one window per generation, never per policy call: a window around every controller decision
measures mostly the meter itself and inflates the overhead, as the authors' code did)::

    meter = make_meter(cfg.eval.energy, device)        # "auto" | "zeus" | "time"
    with meter.window("sample-17") as w:
        out = generate(...)
    m = w.measurement   # Measurement(latency_s=..., energy_j=..., source="zeus:nvml", ...)

Units: seconds and joules only. Zeus itself converts NVML's and RAPL's millijoule counters to joules; nothing
here rescales. Every :class:`Measurement` carries the ``source`` of its numbers; where no counter can be
read, energy fields are ``None`` (serialised as JSON ``null``) with a ``note`` saying why: energy is never
estimated.

* :class:`ZeusMeter` wraps ``zeus.monitor.ZeusMonitor``; with a CUDA device it monitors that GPU and lets Zeus
  call ``torch.cuda.synchronize`` at both window edges (``sync_execution_with="torch"``), so queued kernels are
  counted in the window they belong to. CPU packages are added where RAPL is readable (usually root only);
  RAPL counts the whole package (all processes) and DRAM where exposed, and ``cpu_energy_j`` includes both.
* :class:`TimeOnlyMeter` measures ``time.perf_counter`` latency (synchronising CUDA at the edges too).
* :func:`make_meter` picks one; ``auto`` falls back to time-only and logs why.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

from greencode.config import ConfigError

log = logging.getLogger(__name__)

METER_KINDS = ("auto", "zeus", "time")


@dataclass
class Measurement:
    """One measurement window. Energy in joules, ``None`` where it was not measured."""

    latency_s: float
    energy_j: Optional[float]
    gpu_energy_j: Optional[float]
    cpu_energy_j: Optional[float]
    source: str
    note: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Window:
    """What :meth:`EnergyMeter.window` yields; ``measurement`` is filled in when the block exits normally."""

    name: str
    measurement: Optional[Measurement] = None


def _as_device(device: Any) -> "Any":
    import torch

    if device is None:
        return torch.device("cpu")
    return device if isinstance(device, torch.device) else torch.device(device)


def _cuda_sync(device: Any) -> None:
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


class EnergyMeter(abc.ABC):
    """begin/end named windows; ``window(name)`` is the context-manager form. Window names must be unique
    while open. ``num_windows`` counts completed windows (handy to check one window per generation)."""

    source: str = "unknown"

    def __init__(self) -> None:
        self._open: set[str] = set()
        self.num_windows = 0

    def begin(self, name: str) -> None:
        if name in self._open:
            raise ValueError(f"energy window {name!r} is already open; end it first or use a unique name")
        self._begin(name)
        self._open.add(name)

    def end(self, name: str) -> Measurement:
        if name not in self._open:
            raise ValueError(f"energy window {name!r} was never begun (open windows: {sorted(self._open)})")
        self._open.discard(name)
        m = self._end(name)
        self.num_windows += 1
        return m

    def cancel(self, name: str) -> None:
        """Drop an open window without a measurement (used when the measured code raises)."""
        if name in self._open:
            self._open.discard(name)
            self._cancel(name)

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[Window]:
        w = Window(name)
        self.begin(name)
        try:
            yield w
        except BaseException:
            self.cancel(name)
            raise
        w.measurement = self.end(name)

    @abc.abstractmethod
    def _begin(self, name: str) -> None: ...

    @abc.abstractmethod
    def _end(self, name: str) -> Measurement: ...

    @abc.abstractmethod
    def _cancel(self, name: str) -> None: ...


class TimeOnlyMeter(EnergyMeter):
    """Latency from ``time.perf_counter``; energy is ``None`` and ``note`` says why."""

    source = "time-only"

    def __init__(self, device: Any = None, reason: str = "no energy counter was requested (eval.energy=time)"):
        super().__init__()
        self.device = _as_device(device)
        self.reason = reason
        self._start: dict[str, float] = {}

    def _begin(self, name: str) -> None:
        _cuda_sync(self.device)
        self._start[name] = time.perf_counter()

    def _end(self, name: str) -> Measurement:
        _cuda_sync(self.device)
        latency_s = time.perf_counter() - self._start.pop(name)
        return Measurement(latency_s=latency_s, energy_j=None, gpu_energy_j=None, cpu_energy_j=None,
                           source=self.source, note=f"energy not measured: {self.reason}; it is null, not estimated")

    def _cancel(self, name: str) -> None:
        self._start.pop(name, None)


@dataclass
class ZeusProbe:
    """What Zeus can read on this machine for ``device``."""

    gpu_indices: list[int]
    cpu_indices: list[int]
    gpu_backend: Optional[str]  # "nvml", "nvml-power" (pre-Volta, power polled and integrated), "amdsmi"
    reasons: list[str]

    @property
    def usable(self) -> bool:
        return bool(self.gpu_indices or self.cpu_indices)


def probe_zeus(device: Any) -> ZeusProbe:
    """Find the GPU (only the one ``device`` names) and CPU packages whose energy Zeus can read."""
    from zeus.monitor import energy as zeus_energy

    device = _as_device(device)
    reasons: list[str] = []
    gpu_indices: list[int] = []
    backend = None
    if device.type == "cuda":
        index = device.index
        if index is None:
            import torch

            index = torch.cuda.current_device()
        try:
            gpus = zeus_energy.get_gpus()
            if index < len(gpus):
                gpu_indices = [index]
                if "amd" in type(gpus).__name__.lower():
                    backend = "amdsmi"
                elif gpus.supports_get_total_energy_consumption(index):
                    backend = "nvml"
                else:
                    backend = "nvml-power"
            else:
                reasons.append(f"GPU {index} not among the {len(gpus)} GPUs Zeus sees")
        except Exception as e:  # noqa: BLE001 - zeus raises its own hierarchy; any failure means "not readable"
            reasons.append(f"no GPU energy counter ({type(e).__name__}: {e})")
    else:
        reasons.append(f"device is {device.type}, so no GPU energy is measured")
    cpu_indices: list[int] = []
    try:
        cpus = zeus_energy.get_cpus()
        cpu_indices = list(range(len(cpus)))
        if not cpu_indices:
            reasons.append("RAPL exposes no CPU package")
    except Exception as e:  # noqa: BLE001 - missing RAPL, or not readable without root
        reasons.append(f"no readable CPU energy counter (RAPL) ({type(e).__name__}: {e})")
    return ZeusProbe(gpu_indices, cpu_indices, backend, reasons)


class ZeusMeter(EnergyMeter):
    """``ZeusMonitor`` over the GPU that ``device`` names plus readable RAPL packages; energy in joules."""

    def __init__(self, device: Any, probe: Optional[ZeusProbe] = None):
        super().__init__()
        from zeus.monitor import ZeusMonitor

        self.device = _as_device(device)
        self.probe = probe if probe is not None else probe_zeus(self.device)
        if not self.probe.usable:
            raise ConfigError("eval.energy=zeus but Zeus can read no energy counter on this machine ("
                              + "; ".join(self.probe.reasons) + "); use eval.energy=time (or auto)")
        parts = ([self.probe.gpu_backend or "nvml"] if self.probe.gpu_indices else []) + (
            ["rapl"] if self.probe.cpu_indices else [])
        self.source = "zeus:" + "+".join(parts)
        self.monitor = ZeusMonitor(gpu_indices=list(self.probe.gpu_indices), cpu_indices=list(self.probe.cpu_indices),
                                   sync_execution_with="torch")
        # Zeus synchronises only the GPUs it monitors; a CUDA workload measured by RAPL alone still needs it.
        self._own_sync = self.device.type == "cuda" and not self.probe.gpu_indices
        log.info("energy meter: %s (GPU indices %s, CPU packages %s)", self.source, self.probe.gpu_indices,
                 self.probe.cpu_indices)

    def _begin(self, name: str) -> None:
        if self._own_sync:
            _cuda_sync(self.device)
        self.monitor.begin_window(name, sync_execution=True)

    def _end(self, name: str) -> Measurement:
        if self._own_sync:
            _cuda_sync(self.device)
        m = self.monitor.end_window(name, sync_execution=True)
        notes: list[str] = []
        gpu_j = cpu_j = None
        if self.probe.gpu_indices:
            gpu_j = float(sum(m.gpu_energy[i] for i in self.probe.gpu_indices))
            if gpu_j == 0.0:
                notes.append("GPU energy read 0 J: the window was shorter than the counter's update period")
        else:
            notes.append("GPU energy not measured: " + "; ".join(self.probe.reasons))
        if self.probe.cpu_indices:
            cpu_j = float(sum((m.cpu_energy or {}).values()) + sum((m.dram_energy or {}).values()))
            notes.append("cpu_energy_j is RAPL whole-package energy (all processes) incl. DRAM where exposed")
        energy_j = sum(x for x in (gpu_j, cpu_j) if x is not None)
        return Measurement(latency_s=float(m.time), energy_j=float(energy_j), gpu_energy_j=gpu_j, cpu_energy_j=cpu_j,
                           source=self.source, note="; ".join(notes) or None)

    def _cancel(self, name: str) -> None:
        self.monitor.end_window(name, sync_execution=False, cancel=True)


def make_meter(kind: str = "auto", device: Union[str, Any, None] = None) -> EnergyMeter:
    """``auto``: Zeus where a GPU (for a CUDA device) or readable RAPL is there, else time-only with the reason;
    ``zeus``: Zeus or a ConfigError saying to use ``eval.energy=time``; ``time``: time-only."""
    device = _as_device(device)
    if kind == "time":
        return TimeOnlyMeter(device)
    if kind not in METER_KINDS:
        raise ConfigError(f"eval.energy={kind!r} is not a meter kind; choose one of {', '.join(METER_KINDS)}")
    probe = probe_zeus(device)
    if probe.usable:
        return ZeusMeter(device, probe=probe)
    if kind == "zeus":
        raise ConfigError("eval.energy=zeus but Zeus can read no energy counter on this machine ("
                          + "; ".join(probe.reasons) + "); use eval.energy=time (or auto)")
    reason = "; ".join(probe.reasons)
    log.info("energy meter: time-only (%s)", reason)
    return TimeOnlyMeter(device, reason=reason)
