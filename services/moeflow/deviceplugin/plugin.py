"""The DevicePlugin servicer: device health state plus the kubelet-facing RPCs.

Responses are built by the plain functions at the top (no gRPC, no I/O), so they are tested
without a server. `NpuDevicePlugin` keeps the health of each device and wakes every open
ListAndWatch stream on a change; it must be used from the event loop that runs the server.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
from typing_extensions import override

from moeflow.deviceplugin import api_pb2, api_pb2_grpc
from moeflow.deviceplugin.settings import DevicePluginSettings

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
VISIBLE_DEVICES_ENV = "MOEFLOW_VISIBLE_DEVICES"

Context = grpc.aio.ServicerContext[Any, Any]


class UnknownDeviceError(ValueError):
    """An Allocate or PreStartContainer request named a device this plugin does not have."""

    def __init__(self, device_id: str) -> None:
        super().__init__(f"unknown device id {device_id!r}")
        self.device_id = device_id


def plugin_options() -> api_pb2.DevicePluginOptions:
    return api_pb2.DevicePluginOptions(
        pre_start_required=False, get_preferred_allocation_available=True
    )


def register_request(settings: DevicePluginSettings) -> api_pb2.RegisterRequest:
    return api_pb2.RegisterRequest(
        version=API_VERSION,
        endpoint=settings.socket_name,
        resource_name=settings.resource_name,
        options=plugin_options(),
    )


def list_response(health: Mapping[str, str]) -> api_pb2.ListAndWatchResponse:
    """Every device with its health, in the mapping's order."""
    return api_pb2.ListAndWatchResponse(
        devices=[api_pb2.Device(ID=device_id, health=state) for device_id, state in health.items()]
    )


def device_index(device_id: str) -> int:
    """The number at the end of an id (`npu-3` -> 3)."""
    match = re.search(r"(\d+)$", device_id)
    if match is None:
        raise UnknownDeviceError(device_id)
    return int(match.group(1))


def check_known(device_ids: Iterable[str], known: Iterable[str]) -> None:
    known_ids = set(known)
    for device_id in device_ids:
        if device_id not in known_ids:
            raise UnknownDeviceError(device_id)


def container_allocation(
    device_ids: Sequence[str], settings: DevicePluginSettings
) -> api_pb2.ContainerAllocateResponse:
    """What one container gets for its devices: the ids in an env variable, the node model
    store mounted read-only, and the device nodes when a template is configured."""
    check_known(device_ids, settings.device_ids())
    response = api_pb2.ContainerAllocateResponse(
        envs={VISIBLE_DEVICES_ENV: ",".join(device_ids)}
    )
    if settings.store_host_path is not None:
        response.mounts.append(
            api_pb2.Mount(
                host_path=str(settings.store_host_path),
                container_path=str(settings.store_container_path),
                read_only=True,
            )
        )
    paths = list(settings.shared_device_paths)
    if settings.device_path_template is not None:
        template = settings.device_path_template
        paths += [template.format(index=device_index(d)) for d in device_ids]
    for path in paths:
        response.devices.append(
            api_pb2.DeviceSpec(
                host_path=path, container_path=path, permissions=settings.device_permissions
            )
        )
    return response


def allocate_response(
    request: api_pb2.AllocateRequest, settings: DevicePluginSettings
) -> api_pb2.AllocateResponse:
    """One container response per container request, in order; raises UnknownDeviceError."""
    return api_pb2.AllocateResponse(
        container_responses=[
            container_allocation(list(container.devices_ids), settings)
            for container in request.container_requests
        ]
    )


def preferred_devices(
    available: Sequence[str], must_include: Sequence[str], size: int
) -> list[str]:
    """The required devices, then the lowest-numbered available ones, `size` in all."""
    chosen = list(dict.fromkeys(must_include))
    rest = sorted((d for d in set(available) if d not in chosen), key=_sort_key)
    return (chosen + rest)[: max(size, len(chosen))]


def preferred_allocation_response(
    request: api_pb2.PreferredAllocationRequest,
) -> api_pb2.PreferredAllocationResponse:
    return api_pb2.PreferredAllocationResponse(
        container_responses=[
            api_pb2.ContainerPreferredAllocationResponse(
                deviceIDs=preferred_devices(
                    list(c.available_deviceIDs), list(c.must_include_deviceIDs), c.allocation_size
                )
            )
            for c in request.container_requests
        ]
    )


def parse_health_file(text: str) -> set[str]:
    """Unhealthy device ids: one per line, blank lines and `#` comments ignored."""
    ids = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return {device_id for device_id in ids if device_id}


def _sort_key(device_id: str) -> tuple[int, str]:
    match = re.search(r"(\d+)$", device_id)
    return (int(match.group(1)) if match else -1, device_id)


class NpuDevicePlugin(api_pb2_grpc.DevicePluginServicer):
    """Fake accelerators, all healthy at start; `set_healthy` changes one and is streamed."""

    def __init__(self, settings: DevicePluginSettings) -> None:
        self.settings = settings
        self._health: dict[str, str] = dict.fromkeys(settings.device_ids(), HEALTHY)
        self._changed = asyncio.Event()
        self._epoch = 0
        self._stopped = False

    @property
    def health(self) -> dict[str, str]:
        return dict(self._health)

    def set_healthy(self, device_id: str, healthy: bool) -> bool:
        """Mark one device; True when its state changed (open streams then get a new list)."""
        check_known([device_id], self._health)
        state = HEALTHY if healthy else UNHEALTHY
        if self._health[device_id] == state:
            return False
        log.info("device %s is now %s", device_id, state)
        self._health[device_id] = state
        self._notify()
        return True

    def apply_unhealthy(self, unhealthy: Iterable[str]) -> bool:
        """Set every device's health at once: those listed are unhealthy, the others healthy.
        Unknown ids are logged and ignored. True when anything changed."""
        marked = set(unhealthy)
        for device_id in sorted(marked - self._health.keys()):
            log.warning("health file names unknown device %s; ignored", device_id)
        changed = False
        for device_id in self._health:
            changed |= self.set_healthy(device_id, device_id not in marked)
        return changed

    def end_streams(self) -> None:
        """End the ListAndWatch streams open now; later ones are served as usual."""
        self._epoch += 1
        self._notify()

    def stop(self) -> None:
        """End every open ListAndWatch stream and refuse new ones."""
        self._stopped = True
        self.end_streams()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @override
    async def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: Context
    ) -> api_pb2.DevicePluginOptions:
        return plugin_options()

    @override
    async def ListAndWatch(
        self, request: api_pb2.Empty, context: Context
    ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        epoch = self._epoch
        while not self._stopped and epoch == self._epoch:
            changed = self._changed
            yield list_response(self._health)
            await changed.wait()

    @override
    async def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: Context
    ) -> api_pb2.PreferredAllocationResponse:
        return preferred_allocation_response(request)

    @override
    async def Allocate(
        self, request: api_pb2.AllocateRequest, context: Context
    ) -> api_pb2.AllocateResponse:
        try:
            response = allocate_response(request, self.settings)
        except UnknownDeviceError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        ids = [list(c.devices_ids) for c in request.container_requests]
        log.info("allocated %s", ids)
        return response

    @override
    async def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: Context
    ) -> api_pb2.PreStartContainerResponse:
        try:
            check_known(request.devices_ids, self._health)
        except UnknownDeviceError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return api_pb2.PreStartContainerResponse()
