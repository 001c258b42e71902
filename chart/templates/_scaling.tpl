{{/* Replica counts and HPA bounds of the highly available Deployments (registry, webhook). */}}

{{/* Usage: include "cluster-registry.replicas" (dict "ctx" $ "component" "registry" "ha" $r.highAvailability.enabled "hpa" $r.autoScaling.enabled)
-> a replicas line: 1 without HA; with HA never fewer than the HPA's minimum, also with the HPA on (an omitted count would start a
fresh install at 1, and switching the HPA on would drop a live Deployment to 1), keeping a count the HPA scaled above it (the live
Deployment's, read with `lookup`, which renders nothing under `helm template`). */}}
{{- define "cluster-registry.replicas" -}}
{{- if not .ha }}
replicas: 1
{{- else }}
{{- $live := 0 }}
{{- if .hpa }}
{{- $live = int (dig "spec" "replicas" 0 (lookup "apps/v1" "Deployment" .ctx.Release.Namespace (include "cluster-registry.componentName" .))) }}
{{- end }}
replicas: {{ max (include "cluster-registry.minReplicas" .ctx | int) $live }}
{{- end }}
{{- end -}}

{{/* Usage: include "cluster-registry.minReplicas" $ -> "3", the seed's minimum of a highly available Deployment (and its HPA's). */}}
{{- define "cluster-registry.minReplicas" -}}
3
{{- end -}}

{{/* Usage: include "cluster-registry.hpaBounds" $ -> the seed's HPA numbers: 3..5 replicas, 80% CPU and memory utilisation. */}}
{{- define "cluster-registry.hpaBounds" -}}
minReplicas: {{ include "cluster-registry.minReplicas" . }}
maxReplicas: 5
metrics:
  - type: Resource
    resource:
      name: cpu
      target:
        type: Utilization
        averageUtilization: 80
  - type: Resource
    resource:
      name: memory
      target:
        type: Utilization
        averageUtilization: 80
{{- end -}}
