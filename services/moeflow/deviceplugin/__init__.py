"""Node plane: the kubelet device plugin that advertises MoEFlow's accelerators.

It speaks the kubelet's device plugin API v1beta1 (api.proto, generated api_pb2*) over unix
sockets: registers `moeflow.dev/npu`, lists fake devices and their health, and on Allocate
hands containers their device ids and the node model store mount. See docs/device-plugin.md.
"""
