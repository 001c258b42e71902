{{/* The webhook TLS managed by the certs hook Jobs and rotation CronJob. */}}

{{/* Usage: include "cluster-registry.hookTLS" $ -> "true" when the certs hook Jobs/CronJob manage the webhook TLS. */}}
{{- define "cluster-registry.hookTLS" -}}
{{- if and (include "cluster-registry.webhookInCluster" .) (eq .Values.global.networkfunctionextension.webhook.tls.mode "hook") }}true{{ end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.certsArgs" $ -> the `cluster-registry certs ...` arguments (hook Jobs and rotation CronJob alike). */}}
{{- define "cluster-registry.certsArgs" -}}
- certs
- --secret
- {{ include "cluster-registry.tlsSecret" . }}
- --service
- {{ include "cluster-registry.componentName" (dict "ctx" . "component" "webhook") }}
- --webhook-configuration
- {{ include "cluster-registry.componentName" (dict "ctx" . "component" "webhook") }}
- --renew-before
- {{ .Values.global.networkfunctionextension.webhook.tls.renewBefore }}
{{- if include "cluster-registry.registryTLS" . }}
- --registry-secret
- {{ include "cluster-registry.registryTLSSecret" . }}
- --registry-service
- {{ include "cluster-registry.componentName" (dict "ctx" . "component" "registry") }}
- --registry-deployment
- {{ include "cluster-registry.componentName" (dict "ctx" . "component" "registry") }}
{{- end }}
{{- end -}}
