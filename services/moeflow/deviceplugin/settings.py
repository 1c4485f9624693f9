"""Device-plugin settings: one typed object, read from MOEFLOW_DEVICE_PLUGIN_* variables.

Built once by the CLI (flags override the environment) and passed down; nothing below reads
the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Extended resource names are `<DNS subdomain>/<name>` (as the kubelet validates them).
_RESOURCE_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
_MAX_UNIX_PATH = 107  # sun_path holds 108 bytes, NUL included
_ENV = "MOEFLOW_DEVICE_PLUGIN_"


def _env(*names: str) -> AliasChoices:
    """Environment names of a field that also has a short one (the chart's DaemonSet sets
    MOEFLOW_DEVICE_PLUGIN_RESOURCE and MOEFLOW_DEVICE_PLUGIN_DIR)."""
    return AliasChoices(*(_ENV + name for name in names))


class DevicePluginSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=_ENV, frozen=True, extra="ignore", populate_by_name=True
    )

    resource_name: str = Field(
        "moeflow.dev/npu", pattern=_RESOURCE_NAME, max_length=253,
        validation_alias=_env("RESOURCE_NAME", "RESOURCE"),
    )
    """Extended resource advertised to the kubelet; the operator requests it in engine pods
    (`OperatorSettings.accelerator_resource`)."""

    device_count: int = Field(8, ge=0, le=1024)
    """Fake accelerators advertised on this node, named `<device_prefix>-0` and up."""

    device_prefix: str = Field("npu", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)

    kubelet_dir: Path = Field(
        Path("/var/lib/kubelet/device-plugins"), validation_alias=_env("KUBELET_DIR", "DIR")
    )
    """Kubelet's device-plugin directory: holds kubelet.sock and this plugin's socket."""

    socket_name: str = Field("moeflow-npu.sock", pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")
    """File name of this plugin's socket in `kubelet_dir` (the `endpoint` it registers)."""

    store_host_path: Path | None = Path("/dev/shm/moeflow-store")
    """Node model store (weights pre-loaded into host DRAM), mounted read-only into every
    container that gets devices. None: no mount."""

    store_container_path: Path = Path("/models/store")

    device_path_template: str | None = None
    """Host device node per allocated device, `{index}` replaced by the device number (e.g.
    `/dev/davinci{index}`); exposed at the same path in the container. None: no nodes."""

    shared_device_paths: tuple[str, ...] = ()
    """Host device nodes every allocation gets (control devices, e.g. /dev/davinci_manager)."""

    device_permissions: str = Field("rw", pattern=r"^[rwm]{1,3}$")

    health_file: Path | None = None
    """Optional file listing unhealthy device ids, one per line (`#` starts a comment); a
    missing file means every device is healthy. Polled every `health_poll_s`."""

    health_poll_s: float = Field(1.0, gt=0)

    kubelet_poll_s: float = Field(1.0, gt=0)
    """How often to check whether kubelet.sock was recreated (kubelet restart) or this
    plugin's own socket was removed; either leads to serving again and re-registering."""

    register_timeout_s: float = Field(5.0, gt=0)

    @field_validator("store_container_path", "kubelet_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        if not path.is_absolute():
            raise ValueError(f"must be an absolute path, got {path}")
        return path

    @field_validator("store_host_path", "health_file")
    @classmethod
    def _absolute_or_none(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_absolute():
            raise ValueError(f"must be an absolute path, got {path}")
        return path

    @field_validator("device_path_template")
    @classmethod
    def _template(cls, template: str | None) -> str | None:
        if template is not None and (not template.startswith("/") or "{index}" not in template):
            raise ValueError(f"must be an absolute path containing {{index}}, got {template!r}")
        return template

    @field_validator("shared_device_paths")
    @classmethod
    def _shared(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for path in paths:
            if not path.startswith("/"):
                raise ValueError(f"device paths must be absolute, got {path!r}")
        return paths

    @model_validator(mode="after")
    def _socket_paths_fit(self) -> DevicePluginSettings:
        for name in (self.socket_name, "kubelet.sock"):
            path = self.kubelet_dir / name
            if len(str(path).encode()) > _MAX_UNIX_PATH:
                raise ValueError(f"unix socket path longer than {_MAX_UNIX_PATH} bytes: {path}")
        if self.socket_name == "kubelet.sock":
            raise ValueError("socket_name must not be the kubelet's own kubelet.sock")
        return self

    @property
    def socket_path(self) -> Path:
        return self.kubelet_dir / self.socket_name

    @property
    def kubelet_socket(self) -> Path:
        return self.kubelet_dir / "kubelet.sock"

    def device_ids(self) -> list[str]:
        return [f"{self.device_prefix}-{index}" for index in range(self.device_count)]
