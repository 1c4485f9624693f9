"""Child process of test_ring.py: rank "peer" of GROUP; echoes every message from "main" back
over shm rings (spin window SPIN_US; 0: on the transport itself) until an empty message.

Usage: python ring_peer.py GROUP SPIN_US
"""

from __future__ import annotations

import sys

import torch

from moeflow.xccl import ShmConfig, make_transport
from moeflow.xccl.errors import XcclTimeout
from moeflow.xccl.ring import RingEndpoint

torch.set_num_threads(1)


def main() -> None:
    group, spin_us = sys.argv[1], int(sys.argv[2])
    config = ShmConfig(liveness_interval_s=0.05)
    with make_transport("shm", group, "peer", shm_config=config) as transport:
        ring = (RingEndpoint(transport, config.shm_dir, ["main"], spin_s=spin_us / 1e6)
                if spin_us else transport)
        print("ready", flush=True)
        try:
            while True:
                try:
                    message = ring.recv("main", "ping", 5.0)
                except XcclTimeout:
                    continue
                if not message:
                    return
                ring.send("main", "pong", message, 5.0)
        finally:
            ring.close()


if __name__ == "__main__":
    main()
