{{/* The chart name, or nameOverride. */}}
{{- define "registry-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: <release>-registry-gateway, or the release name when it holds the chart name already. */}}
{{- define "registry-gateway.fullname" -}}
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

{{- define "registry-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "registry-gateway.labels" -}}
helm.sh/chart: {{ include "registry-gateway.chart" . }}
{{ include "registry-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: registry-gateway
{{- end }}

{{/* The labels selectors match on: never change them in an upgrade (selectors are immutable). */}}
{{- define "registry-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "registry-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* The Secret mounted on /run/secrets/registry-gateway: an existing one, or the chart's own. */}}
{{- define "registry-gateway.credentialsSecret" -}}
{{- default (printf "%s-credentials" (include "registry-gateway.fullname" .)) .Values.credentials.existingSecret }}
{{- end }}

{{/* Whether the chart renders a Secret of its own. */}}
{{- define "registry-gateway.ownSecret" -}}
{{- if and (not .Values.credentials.existingSecret) (or .Values.credentials.values .Values.tokenSecret) }}true{{ end }}
{{- end }}
