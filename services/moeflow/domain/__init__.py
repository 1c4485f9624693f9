"""The pure domain shared by every plane: specs, plans, names, roles, the autoscaling policy,
message types and errors. Imports no torch, kopf, kubernetes or web framework (import-linter
keeps it so).
"""
