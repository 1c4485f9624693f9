"""The device plugin over real gRPC unix sockets, against a test double of the kubelet.

The double serves the kubelet's Registration service on `<dir>/kubelet.sock` and records
each Register request; a kubelet restart is a new double on a recreated kubelet.sock.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from moeflow.deviceplugin import api_pb2, api_pb2_grpc
from moeflow.deviceplugin.plugin import VISIBLE_DEVICES_ENV
from moeflow.deviceplugin.server import DevicePluginServer
from moeflow.deviceplugin.settings import DevicePluginSettings

TIMEOUT_S = 5.0
SERVICES = Path(__file__).resolve().parents[3] / "services"


class FakeKubelet(api_pb2_grpc.RegistrationServicer):
    """Kubelet's Registration service: checks and records Register requests."""

    def __init__(self, kubelet_dir: Path) -> None:
        self.kubelet_dir = kubelet_dir
        self.requests: asyncio.Queue[api_pb2.RegisterRequest] = asyncio.Queue()
        self.server = grpc.aio.server()
        api_pb2_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{kubelet_dir / 'kubelet.sock'}")

    async def Register(
        self, request: api_pb2.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> api_pb2.Empty:
        if request.version != "v1beta1":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unsupported version")
        if not (self.kubelet_dir / request.endpoint).exists():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "endpoint not served")
        self.requests.put_nowait(request)
        return api_pb2.Empty()

    async def next_request(self) -> api_pb2.RegisterRequest:
        return await asyncio.wait_for(self.requests.get(), TIMEOUT_S)

    async def stop(self) -> None:
        await self.server.stop(0)
        (self.kubelet_dir / "kubelet.sock").unlink(missing_ok=True)


async def start_kubelet(kubelet_dir: Path) -> FakeKubelet:
    kubelet = FakeKubelet(kubelet_dir)
    await kubelet.server.start()
    return kubelet


@pytest.fixture
def kubelet_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mfdp-", dir="/tmp"))  # short: unix path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_settings(kubelet_dir: Path, **overrides: Any) -> DevicePluginSettings:
    values: dict[str, Any] = {
        "kubelet_dir": kubelet_dir, "device_count": 4, "kubelet_poll_s": 0.05,
        "health_poll_s": 0.05, "register_timeout_s": 2.0,
    }
    return DevicePluginSettings(**(values | overrides))


@pytest.fixture
async def kubelet(kubelet_dir: Path) -> AsyncIterator[FakeKubelet]:
    double = await start_kubelet(kubelet_dir)
    yield double
    await double.stop()


@pytest.fixture
async def plugin_server(
    kubelet: FakeKubelet, kubelet_dir: Path
) -> AsyncIterator[DevicePluginServer]:
    server = DevicePluginServer(make_settings(kubelet_dir))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def stub(plugin_server: DevicePluginServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"unix://{plugin_server.socket_path}") as channel:
        yield api_pb2_grpc.DevicePluginStub(channel)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait until predicate() holds, at most TIMEOUT_S."""
    async with asyncio.timeout(TIMEOUT_S):
        while not predicate():
            await asyncio.sleep(0.01)


def _allocate(*containers: list[str]) -> api_pb2.AllocateRequest:
    return api_pb2.AllocateRequest(container_requests=[
        api_pb2.ContainerAllocateRequest(devices_ids=ids) for ids in containers])


async def test_registers_with_the_kubelet(
    plugin_server: DevicePluginServer, kubelet: FakeKubelet
) -> None:
    request = await kubelet.next_request()
    await eventually(lambda: plugin_server.registrations == 1)
    assert request.version == "v1beta1"
    assert request.resource_name == "moeflow.dev/npu"
    assert request.endpoint == "moeflow-npu.sock"
    assert request.options.get_preferred_allocation_available


async def test_options_preferred_allocation_and_pre_start(stub: Any) -> None:
    options = await stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=TIMEOUT_S)
    assert options.get_preferred_allocation_available and not options.pre_start_required
    preferred = await stub.GetPreferredAllocation(api_pb2.PreferredAllocationRequest(
        container_requests=[api_pb2.ContainerPreferredAllocationRequest(
            available_deviceIDs=["npu-3", "npu-2", "npu-1"], must_include_deviceIDs=["npu-3"],
            allocation_size=2)]), timeout=TIMEOUT_S)
    assert list(preferred.container_responses[0].deviceIDs) == ["npu-3", "npu-1"]
    await stub.PreStartContainer(
        api_pb2.PreStartContainerRequest(devices_ids=["npu-0"]), timeout=TIMEOUT_S)


async def test_list_and_watch_streams_health_changes(
    plugin_server: DevicePluginServer, stub: Any
) -> None:
    stream = stub.ListAndWatch(api_pb2.Empty())
    first = await asyncio.wait_for(stream.read(), TIMEOUT_S)
    assert [(d.ID, d.health) for d in first.devices] == [
        (f"npu-{i}", "Healthy") for i in range(4)]
    plugin_server.plugin.set_healthy("npu-2", False)
    second = await asyncio.wait_for(stream.read(), TIMEOUT_S)
    assert {d.ID: d.health for d in second.devices}["npu-2"] == "Unhealthy"
    stream.cancel()


async def test_health_file_marks_devices_unhealthy(kubelet: FakeKubelet, kubelet_dir: Path) -> None:
    health_file = kubelet_dir / "health"
    server = DevicePluginServer(make_settings(kubelet_dir, health_file=health_file))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{server.socket_path}") as channel:
            stream = api_pb2_grpc.DevicePluginStub(channel).ListAndWatch(api_pb2.Empty())
            await asyncio.wait_for(stream.read(), TIMEOUT_S)
            health_file.write_text("npu-1\n")
            update: Any = await asyncio.wait_for(stream.read(), TIMEOUT_S)
            assert {d.ID for d in update.devices if d.health == "Unhealthy"} == {"npu-1"}
            health_file.unlink()
            update = await asyncio.wait_for(stream.read(), TIMEOUT_S)
            assert {d.health for d in update.devices} == {"Healthy"}
            stream.cancel()
    finally:
        await server.stop()


async def test_allocate_returns_env_and_store_mount(stub: Any) -> None:
    response = await stub.Allocate(_allocate(["npu-0", "npu-1"], ["npu-3"]), timeout=TIMEOUT_S)
    first, second = response.container_responses
    assert first.envs[VISIBLE_DEVICES_ENV] == "npu-0,npu-1"
    assert second.envs[VISIBLE_DEVICES_ENV] == "npu-3"
    (mount,) = first.mounts
    assert (mount.host_path, mount.container_path, mount.read_only) == (
        "/dev/shm/moeflow-store", "/models/store", True)


async def test_allocate_unknown_device_is_invalid_argument(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Allocate(_allocate(["npu-0"], ["npu-9"]), timeout=TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "npu-9" in (raised.value.details() or "")


@pytest.mark.parametrize("remove_plugin_socket", [True, False])
async def test_kubelet_restart_leads_to_re_registration(
    plugin_server: DevicePluginServer, kubelet: FakeKubelet, kubelet_dir: Path,
    remove_plugin_socket: bool,
) -> None:
    await kubelet.next_request()
    await kubelet.stop()
    if remove_plugin_socket:  # what a real kubelet does when it starts
        plugin_server.socket_path.unlink()
    restarted = await start_kubelet(kubelet_dir)
    try:
        request = await restarted.next_request()
        assert (request.version, request.endpoint) == ("v1beta1", "moeflow-npu.sock")
        await eventually(lambda: plugin_server.registrations == 2)
        async with grpc.aio.insecure_channel(f"unix://{plugin_server.socket_path}") as channel:
            stub = api_pb2_grpc.DevicePluginStub(channel)
            await stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=TIMEOUT_S)
    finally:
        await restarted.stop()


async def test_registers_once_the_kubelet_comes_up(kubelet_dir: Path) -> None:
    server = DevicePluginServer(make_settings(kubelet_dir))
    await server.start()
    try:
        assert server.registrations == 0 and server.socket_path.exists()
        kubelet = await start_kubelet(kubelet_dir)
        try:
            await kubelet.next_request()
            await server.wait_registered(TIMEOUT_S)
        finally:
            await kubelet.stop()
    finally:
        await server.stop()


async def test_stop_ends_streams_and_removes_the_socket(
    kubelet: FakeKubelet, kubelet_dir: Path
) -> None:
    server = DevicePluginServer(make_settings(kubelet_dir))
    await server.start()
    async with grpc.aio.insecure_channel(f"unix://{server.socket_path}") as channel:
        stream = api_pb2_grpc.DevicePluginStub(channel).ListAndWatch(api_pb2.Empty())
        await asyncio.wait_for(stream.read(), TIMEOUT_S)
        await asyncio.wait_for(server.stop(), TIMEOUT_S)
        assert await asyncio.wait_for(stream.read(), TIMEOUT_S) is grpc.aio.EOF
    assert not server.socket_path.exists()


def test_cli_serves_until_sigterm_then_removes_its_socket(kubelet_dir: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(SERVICES)}
    process = subprocess.Popen(
        [sys.executable, "-m", "moeflow.deviceplugin", "--kubelet-dir", str(kubelet_dir),
         "--devices", "2"], env=env, stderr=subprocess.PIPE, text=True)
    socket_path = kubelet_dir / "moeflow-npu.sock"
    try:
        for _ in range(200):  # the interpreter and grpc take about a second to start
            if socket_path.exists() or process.poll() is not None:
                break
            time.sleep(0.05)
        assert socket_path.exists(), process.stderr.read() if process.stderr else ""
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert not socket_path.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()
