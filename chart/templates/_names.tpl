{{/*
Object names and labels. Helpers taking a component are called with (dict "ctx" $ "component" "webhook").
Settings live under .Values.global.networkfunctionextension; templates bind it to $v first.
*/}}

{{/* Usage: include "cluster-registry.name" $ -> the chart name (nameOverride wins). */}}
{{- define "cluster-registry.name" -}}
{{- default .Chart.Name .Values.global.networkfunctionextension.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Usage: include "cluster-registry.fullname" $ -> the prefix of every object name (at most 40 characters). */}}
{{- define "cluster-registry.fullname" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- if $v.fullnameOverride -}}
{{- $v.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name $v.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.componentName" (dict "ctx" $ "component" "webhook") -> "<fullname>-webhook". */}}
{{- define "cluster-registry.componentName" -}}
{{- printf "%s-%s" (include "cluster-registry.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Usage: include "cluster-registry.chart" $ -> "cluster-registry-0.1.0" for the helm.sh/chart label. */}}
{{- define "cluster-registry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Usage: include "cluster-registry.selectorLabels" (dict "ctx" $ "component" "webhook") -> the immutable selector labels only. */}}
{{- define "cluster-registry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cluster-registry.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Usage: include "cluster-registry.labels" (dict "ctx" $ "component" "webhook") -> selector labels plus the mutable ones. */}}
{{- define "cluster-registry.labels" -}}
{{ include "cluster-registry.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: cluster-registry
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "cluster-registry.chart" .ctx }}
{{- with .ctx.Values.global.networkfunctionextension.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Usage: include "cluster-registry.tlsSecret" $ -> name of the webhook's TLS Secret (ca.crt, tls.crt, tls.key). */}}
{{- define "cluster-registry.tlsSecret" -}}
{{- include "cluster-registry.componentName" (dict "ctx" . "component" "webhook-tls") -}}
{{- end -}}
