"""Child process of the XCCL two-process test, run as a script (not imported).

    python echo_peer.py KIND GROUP CONFIG_JSON

Opens rank "child" with the given backend config, prints "ready", echoes one "ping" message
from rank "parent" back as "pong", prints "echoed", then sleeps until it is killed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from moeflow.xccl import RedisConfig, ShmConfig, make_transport


def main() -> None:
    kind, group, config_json = sys.argv[1:4]
    torch.set_num_threads(1)
    fields = json.loads(config_json)
    if kind == "shm":
        fields["shm_dir"] = Path(fields["shm_dir"])
        endpoint = make_transport("shm", group, "child", shm_config=ShmConfig(**fields))
    else:
        endpoint = make_transport("redis", group, "child", redis_config=RedisConfig(**fields))
    print("ready", flush=True)
    tensors = endpoint.recv("parent", "ping", 60.0)
    endpoint.send("parent", "pong", tensors, 60.0)
    print("echoed", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
