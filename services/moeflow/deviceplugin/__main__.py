"""`moeflow device-plugin` (or `python -m moeflow.deviceplugin`): run the NPU device plugin.

Flags override MOEFLOW_DEVICE_PLUGIN_* variables, which override the defaults in settings.py.
SIGTERM and SIGINT stop it cleanly (its socket is removed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moeflow.checkpoints.cli import HelpFormatter
from moeflow.deviceplugin import server
from moeflow.deviceplugin.settings import DevicePluginSettings

_E = "MOEFLOW_DEVICE_PLUGIN_"

# flag dest -> settings field, for flags given on the command line (None: not given)
_FIELDS = {
    "resource_name": "resource_name",
    "devices": "device_count",
    "device_prefix": "device_prefix",
    "kubelet_dir": "kubelet_dir",
    "socket_name": "socket_name",
    "store_host_path": "store_host_path",
    "store_container_path": "store_container_path",
    "device_path_template": "device_path_template",
    "shared_device_path": "shared_device_paths",
    "health_file": "health_file",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resource-name",
                        help=f"extended resource (default moeflow.dev/npu; env {_E}RESOURCE_NAME)")
    parser.add_argument("--devices", type=int,
                        help=f"fake accelerators to advertise (default 8; env {_E}DEVICE_COUNT)")
    parser.add_argument("--device-prefix",
                        help=f"device ids are PREFIX-0, PREFIX-1, ... (default npu; env "
                        f"{_E}DEVICE_PREFIX)")
    parser.add_argument("--kubelet-dir", type=Path,
                        help="kubelet device-plugin dir (default /var/lib/kubelet/device-plugins)")
    parser.add_argument("--socket-name", help="this plugin's socket in it (default "
                        f"moeflow-npu.sock; env {_E}SOCKET_NAME)")
    parser.add_argument("--store-host-path", type=Path,
                        help="node model store to mount read-only (default /dev/shm/moeflow-store)")
    parser.add_argument("--store-container-path", type=Path,
                        help="where containers see the store (default /models/store)")
    parser.add_argument("--no-store-mount", action="store_true",
                        help="mount no model store (default: mount --store-host-path)")
    parser.add_argument("--device-path-template",
                        help="host device node per device, e.g. /dev/davinci{index} (default "
                        f"none; env {_E}DEVICE_PATH_TEMPLATE)")
    parser.add_argument("--shared-device-path", action="append",
                        help="device node every allocation gets (repeatable; default none; "
                        f"env {_E}SHARED_DEVICE_PATHS)")
    parser.add_argument("--health-file", type=Path,
                        help="file listing unhealthy device ids, one per line (default none; "
                        f"env {_E}HEALTH_FILE)")


def settings_from_args(args: argparse.Namespace) -> DevicePluginSettings:
    """Settings from the environment, overridden by the flags that were given."""
    given: dict[str, Any] = {
        field: getattr(args, dest)
        for dest, field in _FIELDS.items()
        if getattr(args, dest, None) is not None
    }
    if getattr(args, "no_store_mount", False):
        given["store_host_path"] = None
    return DevicePluginSettings(**given)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM or SIGINT; the exit code (2 for invalid settings)."""
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"moeflow device-plugin: invalid settings:\n{exc}", file=sys.stderr)  # noqa: T201
        return 2
    asyncio.run(_serve(settings))
    return 0


async def _serve(settings: DevicePluginSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.run(settings, stop)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `device-plugin` subcommand to an argparse subparsers object; its `func(args)`
    runs the plugin and returns the exit code."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "device-plugin", help="run the kubelet device plugin that advertises NPUs")
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """`moeflow device-plugin`'s parser (every flag says its default and variable)."""
    parser = argparse.ArgumentParser(prog="moeflow device-plugin", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="log verbosity")
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
