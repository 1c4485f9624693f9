"""Kubernetes access shared by the operator and the data plane: the API facade and Task
discovery. The only package besides the operator that imports the kubernetes client.
"""
