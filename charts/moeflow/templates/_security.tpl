{{/*
Security fragments shared by the chart's workloads (docs/security.md).
*/}}

{{/*
checkov skip annotations: call with a list of "CHECK_ID=reason" strings (no "=" in a reason).
Each names a deliberate choice; the chart's checkov test fails on any other failed check.
*/}}
{{- define "moeflow.checkovSkips" -}}
{{- range $i, $skip := . }}
checkov.io/skip{{ add1 $i }}: {{ $skip | quote }}
{{- end }}
{{- end }}

{{/* The image skips every MoEFlow workload carries (pull policy; digest unless one is set). */}}
{{- define "moeflow.imageSkips" -}}
{{- $skips := list "CKV_K8S_15=IfNotPresent on purpose: engines cold-start from a node-cached image; pin image.digest for immutability" }}
{{- if not .Values.image.digest }}
{{- $skips = append $skips "CKV_K8S_43=pinned by tag (the chart appVersion) unless image.digest is set" }}
{{- end }}
{{- toJson $skips }}
{{- end }}

{{/* Egress rules shared by the NetworkPolicies: cluster DNS, and the Kubernetes API server. */}}
{{- define "moeflow.egressDns" -}}
- to:
    - namespaceSelector: {}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}

{{- define "moeflow.egressApiServer" -}}
{{- $np := .Values.networkPolicy }}
- {{- if $np.apiServerCIDRs }}
  to:
    {{- range $np.apiServerCIDRs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  {{- end }}
  ports:
    {{- range $np.apiServerPorts }}
    - port: {{ . | int64 }}
      protocol: TCP
    {{- end }}
{{- end }}

{{/* The Secret holding the in-chart Redis' password. */}}
{{- define "moeflow.redisAuthSecret" -}}
{{- default (printf "%s-redis-auth" (include "moeflow.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}
