{{/* Which requests the webhook sees. */}}

{{/* Usage: include "cluster-registry.webhookInCluster" $ -> "true" when the webhook runs in the cluster (not URL mode). */}}
{{- define "cluster-registry.webhookInCluster" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- if and $v.enableClusterRegistry (not $v.webhook.url) }}true{{ end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.matchConditionExpression" $ -> the webhook's CEL matchCondition: the value verbatim, or the built-in exclusion. */}}
{{- define "cluster-registry.matchConditionExpression" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- if $v.webhook.pod.mutation.matchConditionExpression -}}
{{- $v.webhook.pod.mutation.matchConditionExpression -}}
{{- else -}}
{{- printf "!(request.namespace in ['kube-system', '%s'])" .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.excludedNamespaces" $ -> JSON list: kube-system, the release namespace, then webhook.excludeNamespaces. */}}
{{- define "cluster-registry.excludedNamespaces" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- concat (list "kube-system" .Release.Namespace) $v.webhook.excludeNamespaces | uniq | toJson -}}
{{- end -}}
