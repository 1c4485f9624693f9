"""Pure response builders of the device plugin (no gRPC server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow.deviceplugin import api_pb2
from moeflow.deviceplugin.plugin import (
    HEALTHY,
    UNHEALTHY,
    VISIBLE_DEVICES_ENV,
    NpuDevicePlugin,
    UnknownDeviceError,
    allocate_response,
    container_allocation,
    list_response,
    parse_health_file,
    plugin_options,
    preferred_allocation_response,
    preferred_devices,
    register_request,
)
from moeflow.deviceplugin.settings import DevicePluginSettings


def _settings(**overrides: object) -> DevicePluginSettings:
    return DevicePluginSettings(device_count=4, **overrides)  # type: ignore[arg-type]


def test_register_request_names_version_endpoint_and_resource() -> None:
    request = register_request(_settings())
    assert request.version == "v1beta1"
    assert request.endpoint == "moeflow-npu.sock"
    assert request.resource_name == "moeflow.dev/npu"
    assert request.options.get_preferred_allocation_available
    assert not request.options.pre_start_required
    assert plugin_options() == request.options


def test_list_response_keeps_order_and_health() -> None:
    response = list_response({"npu-0": HEALTHY, "npu-1": UNHEALTHY})
    assert [(d.ID, d.health) for d in response.devices] == [
        ("npu-0", "Healthy"), ("npu-1", "Unhealthy")]


def test_container_allocation_sets_env_and_read_only_store_mount() -> None:
    response = container_allocation(["npu-0", "npu-1"], _settings())
    assert dict(response.envs) == {VISIBLE_DEVICES_ENV: "npu-0,npu-1"}
    assert [(m.host_path, m.container_path, m.read_only) for m in response.mounts] == [
        ("/dev/shm/moeflow-store", "/models/store", True)]
    assert list(response.devices) == []


def test_container_allocation_adds_device_specs_when_configured() -> None:
    settings = _settings(device_path_template="/dev/davinci{index}",
                         shared_device_paths=("/dev/davinci_manager",), store_host_path=None)
    response = container_allocation(["npu-3"], settings)
    assert [(d.host_path, d.container_path, d.permissions) for d in response.devices] == [
        ("/dev/davinci_manager", "/dev/davinci_manager", "rw"),
        ("/dev/davinci3", "/dev/davinci3", "rw"),
    ]
    assert list(response.mounts) == []


def test_allocate_response_has_one_entry_per_container_in_order() -> None:
    request = api_pb2.AllocateRequest(container_requests=[
        api_pb2.ContainerAllocateRequest(devices_ids=["npu-2"]),
        api_pb2.ContainerAllocateRequest(devices_ids=["npu-0", "npu-1"]),
    ])
    response = allocate_response(request, _settings())
    envs = [c.envs[VISIBLE_DEVICES_ENV] for c in response.container_responses]
    assert envs == ["npu-2", "npu-0,npu-1"]


def test_allocate_refuses_unknown_ids() -> None:
    request = api_pb2.AllocateRequest(container_requests=[
        api_pb2.ContainerAllocateRequest(devices_ids=["npu-0", "npu-4"])])
    with pytest.raises(UnknownDeviceError, match="npu-4"):
        allocate_response(request, _settings())


def test_preferred_devices_keeps_required_then_lowest_numbers() -> None:
    assert preferred_devices(["npu-10", "npu-2", "npu-9", "npu-3"], ["npu-9"], 3) == [
        "npu-9", "npu-2", "npu-3"]
    assert preferred_devices(["npu-1"], [], 0) == []
    assert preferred_devices(["npu-1", "npu-2"], ["npu-2", "npu-1"], 1) == ["npu-2", "npu-1"]


def test_preferred_allocation_response_per_container() -> None:
    request = api_pb2.PreferredAllocationRequest(container_requests=[
        api_pb2.ContainerPreferredAllocationRequest(
            available_deviceIDs=["npu-3", "npu-1", "npu-0"], allocation_size=2)])
    response = preferred_allocation_response(request)
    assert [list(c.deviceIDs) for c in response.container_responses] == [["npu-0", "npu-1"]]


def test_parse_health_file_ignores_blanks_and_comments() -> None:
    text = "# unhealthy devices\nnpu-1\n\n  npu-3  # ECC errors\n"
    assert parse_health_file(text) == {"npu-1", "npu-3"}
    assert parse_health_file("") == set()


def test_plugin_health_changes_report_whether_anything_changed() -> None:
    plugin = NpuDevicePlugin(_settings())
    assert set(plugin.health.values()) == {HEALTHY}
    assert plugin.set_healthy("npu-1", False)
    assert not plugin.set_healthy("npu-1", False)
    assert plugin.apply_unhealthy({"npu-2", "npu-7"})  # npu-7 is unknown: ignored
    assert plugin.health == {
        "npu-0": HEALTHY, "npu-1": HEALTHY, "npu-2": UNHEALTHY, "npu-3": HEALTHY}
    with pytest.raises(UnknownDeviceError):
        plugin.set_healthy("gpu-0", True)


def test_store_paths_are_strings_of_settings_paths() -> None:
    settings = _settings(store_host_path=Path("/mnt/store"), store_container_path="/m")
    (mount,) = container_allocation(["npu-0"], settings).mounts
    assert (mount.host_path, mount.container_path) == ("/mnt/store", "/m")
