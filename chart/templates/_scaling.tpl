{{/* Replica counts and HPA bounds of the highly available Deployments (registry, webhook). */}}

{{/* Usage: include "cluster-registry.replicas" (dict "ha" $r.highAvailability.enabled "hpa" $r.autoScaling.enabled) -> a replicas line,
or nothing when an HPA owns the count (so upgrades never reset what it scaled to). */}}
{{- define "cluster-registry.replicas" -}}
{{- if not .ha }}
replicas: 1
{{- else if not .hpa }}
replicas: 3
{{- end }}
{{- end -}}

{{/* Usage: include "cluster-registry.hpaBounds" $ -> the seed's HPA numbers: 3..5 replicas, 80% CPU and memory utilisation. */}}
{{- define "cluster-registry.hpaBounds" -}}
minReplicas: 3
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
