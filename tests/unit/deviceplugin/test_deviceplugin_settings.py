"""Device-plugin settings: defaults, validation, environment and flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from moeflow.deviceplugin.__main__ import main, settings_from_args
from moeflow.deviceplugin.settings import DevicePluginSettings


def test_defaults_match_the_operator_and_the_kubelet() -> None:
    settings = DevicePluginSettings()
    assert settings.resource_name == "moeflow.dev/npu"
    assert settings.kubelet_socket == Path("/var/lib/kubelet/device-plugins/kubelet.sock")
    assert settings.socket_path == Path("/var/lib/kubelet/device-plugins/moeflow-npu.sock")
    assert settings.store_host_path == Path("/dev/shm/moeflow-store")
    assert settings.store_container_path == Path("/models/store")
    assert settings.device_ids() == [f"npu-{i}" for i in range(8)]


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLOW_DEVICE_PLUGIN_DEVICE_COUNT", "2")
    monkeypatch.setenv("MOEFLOW_DEVICE_PLUGIN_SHARED_DEVICE_PATHS", '["/dev/ctl"]')
    settings = DevicePluginSettings()
    assert settings.device_ids() == ["npu-0", "npu-1"]
    assert settings.shared_device_paths == ("/dev/ctl",)


def test_the_charts_short_variable_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLOW_DEVICE_PLUGIN_RESOURCE", "example.com/accel")
    monkeypatch.setenv("MOEFLOW_DEVICE_PLUGIN_DIR", "/var/lib/k/dp")
    settings = DevicePluginSettings()
    assert settings.resource_name == "example.com/accel"
    assert settings.kubelet_dir == Path("/var/lib/k/dp")
    assert DevicePluginSettings(resource_name="a.io/b").resource_name == "a.io/b"


@pytest.mark.parametrize("overrides", [
    {"resource_name": "npu"},                      # no domain
    {"resource_name": "Moeflow.dev/npu"},          # upper-case domain
    {"device_count": -1},
    {"kubelet_dir": "relative/dir"},
    {"store_host_path": "store"},
    {"store_container_path": "models"},
    {"health_file": "health.txt"},
    {"socket_name": "a/b.sock"},
    {"socket_name": "kubelet.sock"},
    {"device_path_template": "/dev/davinci"},      # no {index}
    {"shared_device_paths": ["dev/ctl"]},
    {"device_permissions": "rx"},
    {"kubelet_dir": "/" + "d" * 100},               # socket path over the unix limit
    {"health_poll_s": 0},
])
def test_invalid_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DevicePluginSettings(**overrides)  # type: ignore[arg-type]


def test_flags_override_and_no_store_mount() -> None:
    import argparse

    from moeflow.deviceplugin.__main__ import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--devices", "3", "--kubelet-dir", "/tmp/k", "--no-store-mount",
                              "--shared-device-path", "/dev/a", "--shared-device-path", "/dev/b"])
    settings = settings_from_args(args)
    assert settings.device_count == 3
    assert settings.kubelet_dir == Path("/tmp/k")
    assert settings.store_host_path is None
    assert settings.shared_device_paths == ("/dev/a", "/dev/b")
    assert settings.resource_name == "moeflow.dev/npu"


def test_main_exits_2_on_invalid_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--resource-name", "no-domain"]) == 2
    assert "invalid settings" in capsys.readouterr().err
