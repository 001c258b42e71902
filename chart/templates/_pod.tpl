{{/* The pod-spec blocks every workload shares: image, placement, security contexts, environment, the Job head. */}}

{{/* Usage: include "cluster-registry.image" (dict "image" $v.image "ctx" $) -> "registry/repository:tag[@digest]". */}}
{{- define "cluster-registry.image" -}}
{{- $tag := default .ctx.Chart.AppVersion (toString .image.tag) -}}
{{- $ref := printf "%s/%s:%s" .image.registry .image.repository $tag -}}
{{- if .image.registry | eq "" -}}
{{- $ref = printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- if .image.digest -}}
{{- $ref = printf "%s@%s" $ref .image.digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{/* Usage: include "cluster-registry.imagePullSecrets" $ -> an imagePullSecrets block (pod spec level) or nothing. */}}
{{- define "cluster-registry.imagePullSecrets" -}}
{{- with .Values.global.networkfunctionextension.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Usage: include "cluster-registry.systemPoolTerm" $ -> the nodeSelectorTerm matching the system pool label. */}}
{{- define "cluster-registry.systemPoolTerm" -}}
{{- $parts := splitList "=" .Values.global.networkfunctionextension.systemPool.nodeLabel -}}
matchExpressions:
  - key: {{ first $parts }}
    operator: In
    values:
      - {{ last $parts | quote }}
{{- end -}}

{{/* Usage: include "cluster-registry.affinity" (dict "ctx" $ "component" "registry" "antiAffinity" true ["colocateWith" "registry"]) -> an affinity
block: system-pool node affinity (preferred, or required with systemPool.required); with antiAffinity, soft pod anti-affinity on
hostname; with colocateWith, required pod affinity to that component's pods on the same node. */}}
{{- define "cluster-registry.affinity" -}}
{{- $v := .ctx.Values.global.networkfunctionextension -}}
affinity:
  nodeAffinity:
    {{- if $v.systemPool.required }}
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms:
        - {{- include "cluster-registry.systemPoolTerm" .ctx | nindent 10 }}
    {{- else }}
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        preference:
          {{- include "cluster-registry.systemPoolTerm" .ctx | nindent 10 }}
    {{- end }}
  {{- if .antiAffinity }}
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "cluster-registry.selectorLabels" . | nindent 14 }}
  {{- end }}
  {{- with .colocateWith }}
  podAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "cluster-registry.selectorLabels" (dict "ctx" $.ctx "component" .) | nindent 12 }}
  {{- end }}
{{- end -}}

{{/* Usage: include "cluster-registry.scheduling" (dict "ctx" $ ["nodeSelector" map]) -> nodeSelector (global merged with the
optional extra) and tolerations (system pool + extra) for a pod spec. */}}
{{- define "cluster-registry.scheduling" -}}
{{- $v := .ctx.Values.global.networkfunctionextension -}}
{{- $selector := merge (deepCopy (default dict .nodeSelector)) $v.nodeSelector }}
{{- with $selector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tolerations := concat $v.systemPool.tolerations $v.extraTolerations }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Usage: include "cluster-registry.podSecurityContext" $ -> the restricted pod securityContext (non-root, seccomp RuntimeDefault). */}}
{{- define "cluster-registry.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  fsGroup: 65532
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Usage: include "cluster-registry.containerSecurityContext" $ -> the restricted container securityContext (read-only root, no capabilities). */}}
{{- define "cluster-registry.containerSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop:
      - ALL
{{- end -}}

{{/* Usage: include "cluster-registry.namespaceEnv" $ -> env entries: POD_NAMESPACE from the downward API and the log settings. */}}
{{- define "cluster-registry.namespaceEnv" -}}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: CLUSTER_REGISTRY_LOG_FORMAT
  value: {{ .Values.global.networkfunctionextension.logFormat | quote }}
- name: CLUSTER_REGISTRY_LOG_LEVEL
  value: {{ .Values.global.networkfunctionextension.logLevel | quote }}
{{- end -}}

{{/* Usage: include "cluster-registry.jobPodSpec" (dict "ctx" $ "serviceAccount" "hooks" ["nodeSelector" map] ["colocateWith" "registry"]) -> the shared head of every Job's pod spec:
ServiceAccount, restartPolicy, security context, system-pool placement (no anti-affinity). */}}
{{- define "cluster-registry.jobPodSpec" -}}
serviceAccountName: {{ include "cluster-registry.componentName" (dict "ctx" .ctx "component" .serviceAccount) }}
restartPolicy: Never
{{- include "cluster-registry.imagePullSecrets" .ctx }}
{{ include "cluster-registry.podSecurityContext" .ctx }}
{{ include "cluster-registry.affinity" (dict "ctx" .ctx "component" .serviceAccount "colocateWith" .colocateWith) }}
{{- include "cluster-registry.scheduling" (dict "ctx" .ctx "nodeSelector" .nodeSelector) }}
{{- end -}}
