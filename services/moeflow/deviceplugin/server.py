"""Lifecycle of the device plugin: serve on a unix socket, register with the kubelet, follow
kubelet restarts and the health file, shut down cleanly.

The kubelet removes every plugin socket in its directory when it restarts, and serves a new
kubelet.sock. `_watch_kubelet` notices either (by polling the two paths) and then serves on a
fresh socket and registers again, as the kubelet expects a restarted plugin to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import grpc

from moeflow.deviceplugin import api_pb2_grpc
from moeflow.deviceplugin.plugin import NpuDevicePlugin, parse_health_file, register_request
from moeflow.deviceplugin.settings import DevicePluginSettings

log = logging.getLogger(__name__)

_FileId = tuple[int, int, int]  # st_dev, st_ino, st_ctime_ns: changes when a path is recreated


def _file_id(path: Path) -> _FileId | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


class DevicePluginServer:
    """Owns the gRPC server of one `NpuDevicePlugin` and its background tasks."""

    def __init__(
        self, settings: DevicePluginSettings, plugin: NpuDevicePlugin | None = None
    ) -> None:
        self.settings = settings
        self.plugin = plugin or NpuDevicePlugin(settings)
        self.registrations = 0
        """Successful Register calls so far (one per kubelet start seen)."""
        self._server: grpc.aio.Server | None = None
        self._socket_id: _FileId | None = None
        self._registered_kubelet: _FileId | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._registered = asyncio.Event()

    @property
    def socket_path(self) -> Path:
        return self.settings.socket_path

    async def start(self) -> None:
        """Serve, then register (now if the kubelet is up, else as soon as it is)."""
        await self._serve()
        await self._register_if_needed()
        self._tasks.append(asyncio.create_task(self._watch_kubelet(), name="kubelet-watch"))
        if self.settings.health_file is not None:
            self._tasks.append(asyncio.create_task(self._watch_health(), name="health-watch"))

    async def wait_registered(self, timeout: float) -> None:
        await asyncio.wait_for(self._registered.wait(), timeout)

    async def stop(self, grace: float = 1.0) -> None:
        """End the streams, stop serving and remove the socket."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self.plugin.stop()
        await self._stop_serving(grace)
        log.info("device plugin stopped")

    async def _serve(self) -> None:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a stale socket of an earlier run
        server = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(self.plugin, server)
        server.add_insecure_port(f"unix://{path}")
        await server.start()
        self._server = server
        self._socket_id = _file_id(path)
        log.info("serving %s (%d devices) on %s", self.settings.resource_name,
                 self.settings.device_count, path)

    async def _stop_serving(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._socket_id is not None and _file_id(self.socket_path) == self._socket_id:
            self.socket_path.unlink(missing_ok=True)
        self._socket_id = None

    async def _register_if_needed(self) -> None:
        """Register with the kubelet if it runs and has not seen this plugin since it started;
        failures are logged and retried on the next poll."""
        kubelet = _file_id(self.settings.kubelet_socket)
        if kubelet is None or kubelet == self._registered_kubelet:
            return
        try:
            await self._register()
        except grpc.aio.AioRpcError as exc:
            log.warning("registration with the kubelet failed (%s: %s); retrying",
                        exc.code().name, exc.details())
            return
        self._registered_kubelet = kubelet
        self.registrations += 1
        self._registered.set()

    async def _register(self) -> None:
        target = f"unix://{self.settings.kubelet_socket}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = api_pb2_grpc.RegistrationStub(channel)
            await stub.Register(
                register_request(self.settings),
                timeout=self.settings.register_timeout_s,
                wait_for_ready=True,
            )
        log.info("registered %s with the kubelet at %s", self.settings.resource_name, target)

    async def _watch_kubelet(self) -> None:
        while True:
            await asyncio.sleep(self.settings.kubelet_poll_s)
            kubelet = _file_id(self.settings.kubelet_socket)
            socket_gone = _file_id(self.socket_path) != self._socket_id
            seen = self._registered_kubelet
            restarted = kubelet is not None and seen is not None and kubelet != seen
            if socket_gone or restarted:
                why = "plugin socket was removed" if socket_gone else "kubelet.sock was recreated"
                log.info("%s (kubelet restart?); serving again and re-registering", why)
                self._registered_kubelet = None
                self.plugin.end_streams()  # the kubelet reopens ListAndWatch after Register
                await self._stop_serving(grace=0.5)
                await self._serve()
            await self._register_if_needed()

    async def _watch_health(self) -> None:
        path = self.settings.health_file
        assert path is not None
        last: str | None = None  # the plugin starts all healthy, as a missing file says
        while True:
            text = await asyncio.to_thread(_read_text, path)
            if text != last:
                last = text
                self.plugin.apply_unhealthy(parse_health_file(text or ""))
            await asyncio.sleep(self.settings.health_poll_s)


async def run(settings: DevicePluginSettings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    server = DevicePluginServer(settings)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()
