{{/* Helm hook annotations and which install hooks render. */}}

{{/* Usage: include "cluster-registry.hookAnnotations" (dict "events" "pre-install,pre-upgrade" "weight" -10) -> helm hook annotations
(delete before re-creation and after success, so re-runs work and nothing lingers). What exists for
every hook event (the hooks' ServiceAccount, its grants, its ConfigMap) is deleted when a hook fails
too, so a failed install leaves no grant behind; a failed Job is kept for its logs. */}}
{{- define "cluster-registry.hookAnnotations" -}}
helm.sh/hook: {{ .events }}
helm.sh/hook-weight: {{ .weight | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded{{ if eq .events "pre-install,pre-upgrade,post-install,post-upgrade" }},hook-failed{{ end }}
{{- end -}}

{{/* Usage: include "cluster-registry.hookEvents" $ -> every event the hook ServiceAccount and RBAC must exist for. */}}
{{- define "cluster-registry.hookEvents" -}}
pre-install,pre-upgrade,post-install,post-upgrade
{{- end -}}

{{/* Usage: include "cluster-registry.hooksNeeded" $ -> "true" when any install hook Job renders (and so the hook ServiceAccount/RBAC). */}}
{{- define "cluster-registry.hooksNeeded" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- if or $v.hooks.validate.enabled (include "cluster-registry.hookTLS" .) (include "cluster-registry.createRegistrySecret" .) $v.enableEarlyLoading $v.enableLocalRegistry }}true{{ end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.createRegistrySecret" $ -> "true" when a hook Job creates the registry's Secrets (the token key, the pushers' credentials, and the registry Secret unless existingSecret names one). */}}
{{- define "cluster-registry.createRegistrySecret" -}}
{{- if .Values.global.networkfunctionextension.enableClusterRegistry }}true{{ end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.durationSeconds" "30m" -> "1800" (a Go duration of one unit: s, m or h). */}}
{{- define "cluster-registry.durationSeconds" -}}
{{- $d := toString . -}}
{{- $units := dict "s" 1 "m" 60 "h" 3600 -}}
{{- $unit := substr (int (sub (len $d) 1)) (len $d) $d -}}
{{- mul (int (trimSuffix $unit $d)) (get $units $unit) -}}
{{- end -}}
