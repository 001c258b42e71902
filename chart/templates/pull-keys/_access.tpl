{{/* Usage: include "cluster-registry.isolated" $ -> "true" when the registry is on and registryAccess.mode is isolated, else "". */}}
{{- define "cluster-registry.isolated" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- if and $v.enableClusterRegistry (eq (($v.registryAccess | default dict).mode | default "isolated") "isolated") -}}true{{- end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.pullKeys" $ -> "<fullname>-pull-keys", the Secret holding the pull-credential keys. */}}
{{- define "cluster-registry.pullKeys" -}}
{{- include "cluster-registry.componentName" (dict "ctx" . "component" "pull-keys") -}}
{{- end -}}
