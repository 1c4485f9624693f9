"""Compute kernels of the decoder that plain ``torch`` calls do not serve well on CPU.

``linear``: weights pre-packed once into oneDNN's blocked layout, so one product streams each
weight once at any batch size (decode at 1, 8 or 32 sequences, and prefill).
"""

from moeflow.engine.kernels.linear import Linear, packing_available

__all__ = ["Linear", "packing_available"]
