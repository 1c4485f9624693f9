{{/*
Shared names, labels and pod fragments. Labels follow app.kubernetes.io/*; the operator's own
children use the same keys (moeflow.controller.naming), with managed-by=moeflow-operator.
*/}}

{{- define "moeflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moeflow.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moeflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: stable across upgrades (never add chart versions). */}}
{{- define "moeflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moeflow.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every label of one component's objects. Call with (dict "root" $ "component" "x"). */}}
{{- define "moeflow.labels" -}}
{{ include "moeflow.selectorLabels" . }}
app.kubernetes.io/part-of: moeflow
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "moeflow.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "moeflow.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "moeflow.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "moeflow.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "moeflow.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis.%s.svc.%s:6379/0" (include "moeflow.fullname" .) .Release.Namespace .Values.operator.clusterDomain }}
{{- else }}
{{- .Values.redis.externalUrl }}
{{- end }}
{{- end }}

{{- define "moeflow.modelsClaim" -}}
{{- default (printf "%s-models" (include "moeflow.fullname" .)) .Values.modelStore.persistence.claimName }}
{{- end }}

{{/*
The operator's namespaced rules: exactly the calls moeflow.controller makes (kube.py through
reconcile_*.py) and kopf makes for it (watches, finalizers and progress annotations by patch,
status through the /status subresource, events by POST). Used by the ClusterRole (all
namespaces) or the Role (operator.watchNamespace); deploy/base carries the same list.
*/}}
{{- define "moeflow.operatorRules" -}}
# Users create Models, Requests and WarmPools; the operator watches them, patches kopf's
# annotations and finalizers, reads Models for batch Requests, and patches the replicas of
# autoscaled roles.
- apiGroups: [moeflow.dev]
  resources: [models, requests, warmpools]
  verbs: [get, list, watch, patch]
# RoleGroups and EngineInstances are the operator's children: created, patched, removed on
# scale-down.
- apiGroups: [moeflow.dev]
  resources: [rolegroups, engineinstances]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [moeflow.dev]
  resources: [models/status, rolegroups/status, engineinstances/status, requests/status, warmpools/status]
  verbs: [get, patch]
# Children carry ownerReferences with blockOwnerDeletion, which clusters running the
# OwnerReferencesPermissionEnforcement admission plugin only allow with update on the owner's
# finalizers.
- apiGroups: [moeflow.dev]
  resources: [models/finalizers, rolegroups/finalizers, engineinstances/finalizers, requests/finalizers,
              warmpools/finalizers]
  verbs: [update]
# One engine Pod per EngineInstance: created, read, replaced (delete + create) when its template changes;
# warm-pool worker Pods likewise; an EngineInstance claiming a warm Pod patches its labels and owner.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, patch, delete]
# Per-Model gateway Service and ServiceAccount, headless instances Service, batch results.
- apiGroups: [""]
  resources: [services, serviceaccounts, configmaps]
  verbs: [get, create, patch]
# The expert balancer's ServiceAccount goes when a Model leaves attention/expert mode.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Per-Model gateway Deployments (watched for Model status) and expert balancer Deployments
# (attention/expert mode; deleted when a Model leaves it).
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
# The per-Model gateway's Role (get/list/watch engineinstances and models, patch its own Model for
# scale from zero) and the expert balancer's Role (get/list/watch engineinstances): all of which the
# operator holds. The balancer's go with attention/expert mode.
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch, delete]
# Each Model's internal token Secret `<model>-internal-token`: created once if absent, read
# back when it exists. Never listed, watched, patched or deleted (no rotation by a reconcile;
# the garbage collector removes it with its Model).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
# Each Model's engines NetworkPolicy `<model>-engines` (it goes with its Model).
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch]
# Users create FineTunes; the operator watches them, patches kopf's annotations and their
# status, and owns their trainer Pods, ServiceAccounts, Roles and RoleBindings (finalizers:
# blockOwnerDeletion, as above). A trainer's Role grants get/patch on its own FineTune's
# status, which the operator holds.
- apiGroups: [moeflow.dev]
  resources: [finetunes]
  verbs: [get, list, watch, patch]
- apiGroups: [moeflow.dev]
  resources: [finetunes/status]
  verbs: [get, patch]
- apiGroups: [moeflow.dev]
  resources: [finetunes/finalizers]
  verbs: [update]
{{- end }}

{{/* Cluster-scoped reads kopf needs in every mode: CRD scanning, and the namespace list. */}}
{{- define "moeflow.operatorClusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if .Values.operator.watchNamespace }}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end }}

{{- define "moeflow.tmpVolume" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 64Mi
{{- end }}

{{/* Cross-field rules the JSON schema cannot state clearly; fails the render with the fix. */}}
{{- define "moeflow.validateValues" -}}
{{- if and .Values.redis.enabled .Values.redis.externalUrl }}
{{- fail "redis.enabled and redis.externalUrl are both set: use the in-chart Redis (redis.enabled=true, externalUrl empty) or an external one (redis.enabled=false, externalUrl=redis://host:6379/0), not both" }}
{{- end }}
{{- if and .Values.operator.watchNamespace (not .Values.operator.serviceAccount.create) (not .Values.operator.serviceAccount.name) }}
{{- fail "operator.serviceAccount.name is required when operator.serviceAccount.create is false" }}
{{- end }}
{{- if and .Values.gateway.enabled (not .Values.gateway.internalTokenSecret.name) }}
{{- fail "gateway.internalTokenSecret.name is required when gateway.enabled is true: engines made by the operator accept work only with their Model's internal token; set it to <model>-internal-token, the Secret the operator makes for a Model in the release namespace (several Models behind one shared gateway: create each <model>-internal-token yourself, with the same key `token`, before applying the Models)" }}
{{- end }}
{{- end }}
