"""XCCL unit tests: pure code only (no servers, files or /dev/shm), one torch thread."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
