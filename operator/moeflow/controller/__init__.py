"""The moeflow control plane: CRDs (deploy/crds) reconciled by a kopf operator.

Layers, pure first: `spec` (typed CR specs) -> `plan` (what to run) -> `naming`, `build_*`
(manifests) and `status` (conditions); I/O in `kube` (the only API-server client), the
`reconcile_*` modules (blocking, one per concern) and `main` (kopf registrations only).
`spec`, `plan`, `naming`, `build_*`, `status` and `batch` import neither kopf nor kubernetes.
"""
