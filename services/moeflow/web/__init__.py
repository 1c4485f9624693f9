"""HTTP plumbing shared by the gateway and engine instances: the OpenAI error envelope, the
wire framing between processes, internal authentication. No torch, no model code.
"""
