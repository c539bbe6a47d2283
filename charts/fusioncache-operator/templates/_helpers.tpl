{{/* The chart name, overridable. */}}
{{- define "fusioncache-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the resources: the release name, plus the chart name unless the release name already holds it.
*/}}
{{- define "fusioncache-operator.fullname" -}}
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

{{- define "fusioncache-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fusioncache-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fusioncache-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fusioncache-operator.labels" -}}
helm.sh/chart: {{ include "fusioncache-operator.chart" . }}
{{ include "fusioncache-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: fusioncache
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "fusioncache-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fusioncache-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fusioncache-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Where the settings file and the secrets it names are mounted in the operator container. */}}
{{- define "fusioncache-operator.configDir" -}}/etc/fusioncache-operator{{- end }}

{{/*
The settings file (FUSIONCACHE_OPERATOR_CONFIG). Admin passwords are not in it: each one is a file mounted
from its Secret, named by adminPasswordFile.
*/}}
{{- define "fusioncache-operator.settings" -}}
{{- $endpoints := .Values.settings.redisEndpoints | default list }}
{{- $names := dict }}
{{- range $endpoints }}
{{- if hasKey $names .name }}
{{- fail (printf "settings.redisEndpoints: the name %q is used twice" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- end }}
{{- with .Values.settings.defaultRedisEndpoint }}
{{- if not (hasKey $names .) }}
{{- fail (printf "settings.defaultRedisEndpoint %q is not the name of one of settings.redisEndpoints" .) }}
{{- end }}
{{- end }}
{{- if $endpoints }}
redisEndpoints:
{{- range $endpoints }}
  - name: {{ .name | quote }}
    url: {{ .url | quote }}
    {{- if hasKey . "databases" }}
    databases: {{ .databases }}
    {{- end }}
    {{- with .adminUsername }}
    adminUsername: {{ . | quote }}
    {{- end }}
    {{- if .adminPasswordSecretRef }}
    adminPasswordFile: {{ printf "%s/secrets/%s/password" (include "fusioncache-operator.configDir" $) .name | quote }}
    {{- end }}
{{- end }}
{{- else }}
redisEndpoints: []
{{- end }}
{{- with .Values.settings.defaultRedisEndpoint }}
defaultRedisEndpoint: {{ . | quote }}
{{- end }}
{{- with .Values.settings.defaultNatsUrl }}
defaultNatsUrl: {{ . | quote }}
{{- end }}
{{- end }}

{{/* The Lease of leader election. */}}
{{- define "fusioncache-operator.leaseName" -}}
{{- default (include "fusioncache-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
The operator's rules, exactly the verbs it uses (the end-to-end tests check the request log against them):
it watches FusionCaches, writes their status and finalizer (JSON patch), reads the Secrets they refer to,
checks, applies and (when a resource loses its allocation) deletes the ConfigMap and Secret it renders for
each (owned by it, so they are garbage-collected with it; `blockOwnerDeletion` needs `update` on
fusioncaches/finalizers), and records events (`patch` for a repeated one).
*/}}
{{- define "fusioncache-operator.rules" -}}
- apiGroups: ["fusioncache.io"]
  resources: ["fusioncaches"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["fusioncache.io"]
  resources: ["fusioncaches/status"]
  verbs: ["patch"]
- apiGroups: ["fusioncache.io"]
  resources: ["fusioncaches/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["configmaps", "secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
