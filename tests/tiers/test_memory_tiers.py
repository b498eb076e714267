"""Host and device drivers beyond the shared suite: configuration, threads, CUDA streams and events."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import FrozenInstanceError
from typing import Any, TypeVar

import pytest
import torch

from klotski_tier.core.errors import ConfigError
from klotski_tier.tiers.base import MemoryTierDriver
from klotski_tier.tiers.device import CopyDone, DeviceDriver
from klotski_tier.tiers.host import HostDriver
from klotski_tier.tiers.registry import TIER_DRIVERS

T = TypeVar("T")

HAS_CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
no_cuda_only = pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without CUDA")
COPY_BYTES = 1 << 16  # 64 KiB: big enough for a real DMA, small enough for any machine


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class FakeStream:
    """Records the events it was asked to wait on."""

    def __init__(self) -> None:
        self.waited: list[Any] = []

    def wait_event(self, event: Any) -> None:
        self.waited.append(event)


# ---------------------------------------------------------------- configuration


def test_host_pins_only_when_asked() -> None:
    assert HostDriver().pinned is False  # the runtime asks when its compute device is CUDA
    assert HostDriver(pin=False).pinned is False


@no_cuda_only
def test_pinning_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="pinned host memory needs CUDA"):
        HostDriver(pin=True)


def test_device_defaults_to_cuda_when_available_else_cpu() -> None:
    assert DeviceDriver().device.type == ("cuda" if HAS_CUDA else "cpu")
    assert DeviceDriver("cpu").device == torch.device("cpu")
    assert DeviceDriver(torch.device("cpu")).device == torch.device("cpu")


@no_cuda_only
def test_cuda_device_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="needs CUDA"):
        DeviceDriver("cuda")


@pytest.mark.parametrize("device", ["meta", "warp-drive"])
def test_unsupported_device_is_a_config_error(device: str) -> None:
    with pytest.raises(ConfigError, match=r"cpu.*cuda"):
        DeviceDriver(device)


def test_copy_done_is_frozen() -> None:
    done = CopyDone(None)
    with pytest.raises(FrozenInstanceError):
        done.event = object()  # type: ignore[misc]


def test_registry_names_the_three_drivers() -> None:
    assert TIER_DRIVERS.names() == ["device", "disk", "host"]
    assert TIER_DRIVERS.get("host") is HostDriver
    assert TIER_DRIVERS.get("device") is DeviceDriver


# ---------------------------------------------------------------- threads


@pytest.mark.parametrize("make", [HostDriver, lambda: DeviceDriver("cpu")], ids=["host", "device-cpu"])
def test_jobs_run_in_the_drivers_own_thread(make: Any) -> None:
    async def scenario() -> tuple[str, str]:
        async with make() as tier:
            worker: threading.Thread = await tier._run_job(threading.current_thread)
            return worker.name, threading.current_thread().name

    worker, loop_thread = run(scenario())
    assert worker != loop_thread
    assert worker.startswith("klotski-")


def test_cpu_device_wait_ready_is_a_no_op() -> None:
    stream = FakeStream()
    DeviceDriver("cpu").wait_ready(CopyDone(None), stream)
    assert stream.waited == []


def test_host_copy_source_must_match_the_buffer() -> None:
    async def scenario() -> None:
        async with HostDriver(pin=False) as host:
            with pytest.raises(AssertionError, match="shapes and dtypes must match"):
                await host.copy_from_host(host.allocate(8), torch.zeros(4, dtype=torch.uint8))

    run(scenario())


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_host_allocates_pinned_memory() -> None:
    host: MemoryTierDriver = HostDriver(pin=True)
    buffer = host.allocate(COPY_BYTES)
    assert buffer.is_pinned() and buffer.device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_copy_runs_on_the_copy_stream_and_records_an_event() -> None:
    async def scenario() -> None:
        async with HostDriver(pin=True) as host, DeviceDriver("cuda") as device:
            src = host.allocate(COPY_BYTES)
            src.copy_(torch.randint(0, 255, (COPY_BYTES,), dtype=torch.uint8))
            dst = device.allocate(COPY_BYTES)
            done = await device.copy_from_host(dst, src)
            assert isinstance(done.event, torch.cuda.Event) and done.event.query()  # type: ignore[no-untyped-call]
            assert device._stream is not None and device._stream != torch.cuda.current_stream()
            device.wait_ready(done)
            assert torch.equal(dst.cpu(), src)

    run(scenario())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_wait_ready_makes_the_compute_stream_wait_on_the_copy_event() -> None:
    async def scenario() -> None:
        async with HostDriver(pin=True) as host, DeviceDriver("cuda") as device:
            src = host.allocate(COPY_BYTES)
            src.fill_(7)
            dst = device.allocate(COPY_BYTES)
            done = await device.copy_from_host(dst, src)
            recorder = FakeStream()
            device.wait_ready(done, recorder)
            assert recorder.waited == [done.event]
            compute = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            device.wait_ready(done, compute)
            with torch.cuda.stream(compute):
                total = dst.to(torch.int64).sum()
            compute.synchronize()
            assert int(total) == 7 * COPY_BYTES

    run(scenario())


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 70_000, 1 << 20])
def test_host_buffers_start_on_a_page_boundary(nbytes: int) -> None:
    """O_DIRECT reads land straight in host buffers only if these are page aligned."""
    buffer = HostDriver(pin=False).allocate(nbytes)
    assert buffer.data_ptr() % 4096 == 0 and buffer.numel() == nbytes and buffer.is_contiguous()


def test_a_closed_device_tier_says_so_before_it_looks_at_the_buffers() -> None:
    """The conformance test's CUDA run found the argument check firing first: a closed driver's
    error must name the closing, whatever buffers it was handed (here: a buffer on another device)."""
    from klotski_tier.core.errors import TierError

    async def scenario() -> None:
        tier = DeviceDriver("cpu")
        await tier.aclose()
        with pytest.raises(TierError, match="closed; create a new driver"):
            await tier.copy_from_host(
                torch.empty(4, dtype=torch.uint8, device="meta"), torch.ones(4, dtype=torch.uint8)
            )

    asyncio.run(scenario())
