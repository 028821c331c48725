"""Energy meters with the hardware mocked at Zeus's device layer (the real ZeusMonitor runs on top)."""

from __future__ import annotations

import types

import pytest
import torch
from zeus.device.cpu.common import CpuDramMeasurement, ZeusCPUInitError
from zeus.device.gpu.common import ZeusGPUInitError
from zeus.device.soc.common import ZeusSoCInitError
from zeus.monitor import energy as zeus_energy
from zeus.utils import framework as zeus_framework

from greencode.config import ConfigError
from greencode.energy import Measurement, TimeOnlyMeter, ZeusMeter, make_meter, probe_zeus


class FakeNVMLGPUs:
    """NVML-like cumulative energy counters in millijoules, one list of readings per GPU."""

    def __init__(self, readings_mj: dict[int, list[float]], events: list, n: int = 1, total_energy: bool = True):
        self.readings = {i: list(v) for i, v in readings_mj.items()}
        self.events = events
        self.n = n
        self.total_energy = total_energy

    def __len__(self) -> int:
        return self.n

    def supports_get_total_energy_consumption(self, index: int) -> bool:
        return self.total_energy

    def get_total_energy_consumption(self, index: int) -> float:
        self.events.append(("read_gpu", index))
        return self.readings[index].pop(0)


class FakeRAPLCPUs:
    def __init__(self, readings: list[tuple[float, float | None]]):
        self.readings = list(readings)

    def __len__(self) -> int:
        return 1

    def get_total_energy_consumption(self, index: int) -> CpuDramMeasurement:
        cpu_mj, dram_mj = self.readings.pop(0)
        return CpuDramMeasurement(cpu_mj=cpu_mj, dram_mj=dram_mj)


def _raise(exc):
    def f():
        raise exc

    return f


@pytest.fixture
def hw(monkeypatch):
    """Patch Zeus's device discovery (nothing real is touched) and record torch.cuda.synchronize calls."""
    events: list = []
    state = types.SimpleNamespace(events=events)

    def set_gpus(gpus):
        monkeypatch.setattr(zeus_energy, "get_gpus", (lambda: gpus) if gpus is not None
                            else _raise(ZeusGPUInitError("NVML and AMDSMI unavailable")))

    def set_cpus(cpus):
        monkeypatch.setattr(zeus_energy, "get_cpus", (lambda: cpus) if cpus is not None
                            else _raise(ZeusCPUInitError("RAPL unavailable")))

    state.set_gpus, state.set_cpus = set_gpus, set_cpus
    set_gpus(None)
    set_cpus(None)
    monkeypatch.setattr(zeus_energy, "get_soc", _raise(ZeusSoCInitError("no SoC")))
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(synchronize=lambda d=None: events.append(("sync", d))))
    monkeypatch.setattr(zeus_framework, "torch_is_available", lambda **kw: True)
    monkeypatch.setitem(zeus_framework.MODULE_CACHE, "torch", fake_torch)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: events.append(("sync", d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return state


def test_zeus_meter_gpu_joules_and_sync_at_window_edges(hw):
    hw.set_gpus(FakeNVMLGPUs({0: [1_000.0, 5_500.0]}, hw.events))  # mJ counter: 4.5 J in the window
    meter = make_meter("auto", torch.device("cuda", 0))
    assert isinstance(meter, ZeusMeter)
    with meter.window("gen-0") as w:
        hw.events.append("work")
    m = w.measurement
    assert m.gpu_energy_j == pytest.approx(4.5)
    assert m.energy_j == pytest.approx(4.5)
    assert m.cpu_energy_j is None
    assert m.source == "zeus:nvml"
    assert m.latency_s >= 0.0
    # sync before the first counter read and before the last one: queued kernels land in this window
    assert hw.events == [("sync", 0), ("read_gpu", 0), "work", ("sync", 0), ("read_gpu", 0)]
    assert meter.num_windows == 1


def test_zeus_meter_sums_gpu_and_rapl_cpu_with_dram(hw):
    hw.set_gpus(FakeNVMLGPUs({0: [0.0, 0.0], 1: [10_000.0, 12_000.0]}, hw.events, n=2))
    hw.set_cpus(FakeRAPLCPUs([(100_000.0, 20_000.0), (103_000.0, 20_500.0)]))  # 3 J package + 0.5 J DRAM
    meter = make_meter("zeus", "cuda:1")  # only the GPU the device names is monitored
    meter.begin("a")
    m = meter.end("a")
    assert m.gpu_energy_j == pytest.approx(2.0)
    assert m.cpu_energy_j == pytest.approx(3.5)
    assert m.energy_j == pytest.approx(5.5)
    assert m.source == "zeus:nvml+rapl"
    assert ("read_gpu", 0) not in hw.events and ("sync", 1) in hw.events


def test_zero_gpu_reading_is_reported_not_hidden(hw):
    hw.set_gpus(FakeNVMLGPUs({0: [7.0, 7.0]}, hw.events))
    meter = make_meter("zeus", "cuda")
    with pytest.warns(UserWarning):  # Zeus's own warning about the counter update period
        with meter.window("short") as w:
            pass
    assert w.measurement.gpu_energy_j == 0.0 and "update period" in w.measurement.note


def test_rapl_only_on_cpu_device(hw):
    hw.set_gpus(FakeNVMLGPUs({0: [0.0, 1e9]}, hw.events))  # a GPU exists but the device is cpu: not measured
    hw.set_cpus(FakeRAPLCPUs([(1_000.0, None), (1_250.0, None)]))
    meter = make_meter("auto", "cpu")
    meter.begin("x")
    m = meter.end("x")
    assert m.source == "zeus:rapl"
    assert m.gpu_energy_j is None and m.cpu_energy_j == pytest.approx(0.25) and m.energy_j == pytest.approx(0.25)
    assert "GPU energy not measured" in m.note and "device is cpu" in m.note
    assert not any(e[0] == "sync" for e in hw.events if isinstance(e, tuple))


def test_auto_falls_back_to_time_only_with_reason(hw):
    meter = make_meter("auto", "cuda:0")
    assert isinstance(meter, TimeOnlyMeter)
    with meter.window("g") as w:
        pass
    m = w.measurement
    assert (m.energy_j, m.gpu_energy_j, m.cpu_energy_j) == (None, None, None)
    assert m.source == "time-only"
    assert "ZeusGPUInitError" in m.note and "RAPL" in m.note
    assert hw.events == [("sync", torch.device("cuda", 0))] * 2  # latency of a CUDA workload is still synced


def test_time_meter_on_cpu_measures_time_and_never_syncs(hw):
    meter = make_meter("time", "cpu")
    with meter.window("g") as w:
        sum(range(10_000))
    assert w.measurement.latency_s > 0 and w.measurement.energy_j is None
    assert "eval.energy=time" in w.measurement.note
    assert hw.events == []
    assert Measurement(**w.measurement.to_dict()) == w.measurement


def test_zeus_requested_without_counters_is_a_clear_error(hw):
    with pytest.raises(ConfigError, match="eval.energy=time"):
        make_meter("zeus", "cpu")
    with pytest.raises(ConfigError, match="eval.energy=time"):
        ZeusMeter("cuda:0")


def test_unknown_kind_and_window_misuse(hw):
    with pytest.raises(ConfigError, match="auto, zeus, time"):
        make_meter("nvml", "cpu")
    meter = make_meter("time", "cpu")
    meter.begin("a")
    with pytest.raises(ValueError, match="already open"):
        meter.begin("a")
    with pytest.raises(ValueError, match="never begun"):
        meter.end("b")


def test_exception_inside_window_cancels_it(hw):
    hw.set_gpus(FakeNVMLGPUs({0: [1.0, 2.0, 3.5]}, hw.events))
    meter = make_meter("zeus", "cuda:0")
    with pytest.raises(RuntimeError, match="boom"):
        with meter.window("w"):
            raise RuntimeError("boom")
    assert meter.num_windows == 0 and meter.monitor.measurement_states == {}
    with meter.window("w") as w:  # the name is free again
        pass
    assert w.measurement.gpu_energy_j == pytest.approx(0.0015)  # 3.5 mJ - 2.0 mJ


def test_probe_reports_out_of_range_gpu(hw):
    hw.set_gpus(FakeNVMLGPUs({}, hw.events, n=1))
    p = probe_zeus("cuda:3")
    assert p.gpu_indices == [] and "GPU 3" in p.reasons[0] and not p.usable
