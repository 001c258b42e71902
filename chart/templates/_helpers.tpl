{{/*
Helpers of the cluster-registry chart. Every setting lives under .Values.global.networkfunctionextension;
templates bind it to $v first. Helpers taking a component are called with
(dict "ctx" $ "component" "webhook").
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

{{/* Usage: include "cluster-registry.registryResources" $ -> requests/limits of the distribution container from registryService.scale. */}}
{{- define "cluster-registry.registryResources" -}}
{{- $sizes := dict
  "small" (dict "requests" (dict "cpu" "100m" "memory" "250Mi") "limits" (dict "cpu" "100m" "memory" "2Gi"))
  "medium" (dict "requests" (dict "cpu" "250m" "memory" "500Mi") "limits" (dict "cpu" "500m" "memory" "2Gi"))
  "large" (dict "requests" (dict "cpu" "500m" "memory" "1Gi") "limits" (dict "cpu" "1" "memory" "4Gi")) -}}
{{- toYaml (get $sizes .Values.global.networkfunctionextension.clusterRegistry.registryService.scale) -}}
{{- end -}}

{{/* Usage: include "cluster-registry.registryHA" $ -> "true" when the registry runs highly available. */}}
{{- define "cluster-registry.registryHA" -}}
{{- if .Values.global.networkfunctionextension.clusterRegistry.highAvailability.enabled }}true{{ end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.webhookInCluster" $ -> "true" when the webhook runs in the cluster (not URL mode). */}}
{{- define "cluster-registry.webhookInCluster" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- if and $v.enableClusterRegistry (not $v.webhook.url) }}true{{ end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.hookTLS" $ -> "true" when the certs hook Jobs/CronJob manage the webhook TLS. */}}
{{- define "cluster-registry.hookTLS" -}}
{{- if and (include "cluster-registry.webhookInCluster" .) (eq .Values.global.networkfunctionextension.webhook.tls.mode "hook") }}true{{ end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.accessMode" $ -> the registry PVC access mode (explicit, or RWX with HA, RWO without). */}}
{{- define "cluster-registry.accessMode" -}}
{{- $r := .Values.global.networkfunctionextension.clusterRegistry -}}
{{- if $r.storageAccessMode -}}
{{- $r.storageAccessMode -}}
{{- else if $r.highAvailability.enabled -}}
ReadWriteMany
{{- else -}}
ReadWriteOnce
{{- end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.claimName" $ -> the registry PVC name (existingClaim or the chart's). */}}
{{- define "cluster-registry.claimName" -}}
{{- default (include "cluster-registry.componentName" (dict "ctx" . "component" "registry")) .Values.global.networkfunctionextension.clusterRegistry.existingClaim -}}
{{- end -}}

{{/* Usage: include "cluster-registry.registrySecret" $ -> name of the Secret with http-secret and credentials.yaml. */}}
{{- define "cluster-registry.registrySecret" -}}
{{- default (include "cluster-registry.componentName" (dict "ctx" . "component" "registry")) .Values.global.networkfunctionextension.clusterRegistry.existingSecret -}}
{{- end -}}

{{/* Usage: include "cluster-registry.tlsSecret" $ -> name of the webhook's TLS Secret (ca.crt, tls.crt, tls.key). */}}
{{- define "cluster-registry.tlsSecret" -}}
{{- include "cluster-registry.componentName" (dict "ctx" . "component" "webhook-tls") -}}
{{- end -}}

{{/* Usage: include "cluster-registry.registryServiceHost" $ -> "<svc>.<ns>.svc:<port>", how pods in the cluster reach the registry. */}}
{{- define "cluster-registry.registryServiceHost" -}}
{{- printf "%s.%s.svc:%d" (include "cluster-registry.componentName" (dict "ctx" . "component" "registry")) .Release.Namespace (int .Values.global.networkfunctionextension.clusterRegistry.registryService.port) -}}
{{- end -}}

{{/* Usage: include "cluster-registry.registryHost" $ -> the rewrite target as nodes pull it (webhook.registryHost, localhost:<nodePort>, or the Service DNS name). */}}
{{- define "cluster-registry.registryHost" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- $svc := $v.clusterRegistry.registryService -}}
{{- if $v.webhook.registryHost -}}
{{- $v.webhook.registryHost -}}
{{- else if and (eq $svc.type "NodePort") (gt (int $svc.nodePort) 0) -}}
{{- printf "localhost:%d" (int $svc.nodePort) -}}
{{- else -}}
{{- printf "%s.%s.svc.cluster.local:%d" (include "cluster-registry.componentName" (dict "ctx" . "component" "registry")) .Release.Namespace (int $svc.port) -}}
{{- end -}}
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

{{/* Usage: include "cluster-registry.hookAnnotations" (dict "events" "pre-install,pre-upgrade" "weight" -10) -> helm hook annotations
(delete before re-creation and after success, so re-runs work and nothing lingers). */}}
{{- define "cluster-registry.hookAnnotations" -}}
helm.sh/hook: {{ .events }}
helm.sh/hook-weight: {{ .weight | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end -}}

{{/* Usage: include "cluster-registry.hookEvents" $ -> every event the hook ServiceAccount and RBAC must exist for. */}}
{{- define "cluster-registry.hookEvents" -}}
pre-install,pre-upgrade,post-install,post-upgrade
{{- end -}}

{{/* Usage: include "cluster-registry.crdConditions" $ -> the OpenAPI schema of a status.conditions list (both CRDs). */}}
{{- define "cluster-registry.crdConditions" -}}
type: array
x-kubernetes-list-type: map
x-kubernetes-list-map-keys:
  - type
items:
  type: object
  required:
    - type
    - status
  properties:
    type:
      type: string
    status:
      type: string
      enum:
        - "True"
        - "False"
        - Unknown
    reason:
      type: string
    message:
      type: string
    lastTransitionTime:
      type: string
      format: date-time
    observedGeneration:
      type: integer
      format: int64
{{- end -}}

{{/* Usage: include "cluster-registry.distributionConfig" $ -> distribution's config.yml. http.secret and driver keys come from
the environment (REGISTRY_HTTP_SECRET, REGISTRY_STORAGE_*), never from the ConfigMap. */}}
{{- define "cluster-registry.distributionConfig" -}}
{{- $r := .Values.global.networkfunctionextension.clusterRegistry -}}
version: 0.1
log:
  level: info
  formatter: json
  fields:
    service: registry
storage:
  {{- if eq $r.storage.driver "s3" }}
  s3:
    bucket: {{ $r.storage.s3.bucket | quote }}
    region: {{ $r.storage.s3.region | quote }}
    {{- with $r.storage.s3.regionEndpoint }}
    regionendpoint: {{ . | quote }}
    {{- end }}
    rootdirectory: {{ $r.storage.s3.rootDirectory | quote }}
    forcepathstyle: {{ $r.storage.s3.forcePathStyle }}
  redirect:
    disable: true
  {{- else if eq $r.storage.driver "azure" }}
  azure:
    accountname: {{ $r.storage.azure.accountName | quote }}
    container: {{ $r.storage.azure.container | quote }}
    realm: {{ $r.storage.azure.realm | quote }}
    rootdirectory: {{ $r.storage.azure.rootDirectory | quote }}
    credentials:
      type: {{ ternary "shared_key" "default_credentials" (ne $r.storage.azure.secretName "") }}
  redirect:
    disable: true
  {{- else }}
  filesystem:
    rootdirectory: /var/lib/registry
  {{- end }}
  delete:
    enabled: true
  # No blobdescriptor cache: after GC's sweep a cached descriptor would let a manifest that names a
  # swept blob be accepted.
  maintenance:
    uploadpurging:
      enabled: true
      age: 168h
      interval: 24h
      dryrun: false
    readonly:
      enabled: false
http:
  addr: 127.0.0.1:5001
  relativeurls: true
  headers:
    X-Content-Type-Options:
      - nosniff
  debug:
    addr: 0.0.0.0:5002
    prometheus:
      enabled: true
      path: /metrics
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
{{- end -}}

{{/* Usage: include "cluster-registry.storageEnv" $ -> env entries with the object-storage driver's keys from their Secret (or nothing). */}}
{{- define "cluster-registry.storageEnv" -}}
{{- $s := .Values.global.networkfunctionextension.clusterRegistry.storage -}}
{{- if and (eq $s.driver "s3") $s.s3.secretName }}
- name: REGISTRY_STORAGE_S3_ACCESSKEY
  valueFrom:
    secretKeyRef:
      name: {{ $s.s3.secretName }}
      key: accesskey
- name: REGISTRY_STORAGE_S3_SECRETKEY
  valueFrom:
    secretKeyRef:
      name: {{ $s.s3.secretName }}
      key: secretkey
{{- else if and (eq $s.driver "azure") $s.azure.secretName }}
- name: REGISTRY_STORAGE_AZURE_ACCOUNTKEY
  valueFrom:
    secretKeyRef:
      name: {{ $s.azure.secretName }}
      key: accountkey
{{- end }}
{{- end -}}

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

{{/* Usage: include "cluster-registry.durationSeconds" "30m" -> "1800" (a Go duration of one unit: s, m or h). */}}
{{- define "cluster-registry.durationSeconds" -}}
{{- $d := toString . -}}
{{- $units := dict "s" 1 "m" 60 "h" 3600 -}}
{{- $unit := substr (int (sub (len $d) 1)) (len $d) $d -}}
{{- mul (int (trimSuffix $unit $d)) (get $units $unit) -}}
{{- end -}}

{{/* Usage: include "cluster-registry.hooksNeeded" $ -> "true" when any install hook Job renders (and so the hook ServiceAccount/RBAC). */}}
{{- define "cluster-registry.hooksNeeded" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- if or $v.hooks.validate.enabled (include "cluster-registry.hookTLS" .) (include "cluster-registry.createRegistrySecret" .) $v.enableEarlyLoading $v.enableLocalRegistry }}true{{ end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.createRegistrySecret" $ -> "true" when a hook Job creates the registry Secret (no existingSecret). */}}
{{- define "cluster-registry.createRegistrySecret" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- if and $v.enableClusterRegistry (not $v.clusterRegistry.existingSecret) }}true{{ end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.sourceRegistryArgs" $ -> args for reaching source registries (plain HTTP list, CA bundle), shared by both reconcilers. */}}
{{- define "cluster-registry.sourceRegistryArgs" -}}
{{- $c := .Values.global.networkfunctionextension.artifactReconciler -}}
{{- range $c.insecureRegistries }}
- --insecure-registry
- {{ . | quote }}
{{- end }}
{{- if $c.caBundleConfigMap }}
- --ca-bundle
- /etc/cluster-registry/ca/ca.crt
{{- end }}
{{- end -}}

{{/* Usage: include "cluster-registry.caBundleMount" $ -> the volumeMount for the source registries' CA bundle, if any. */}}
{{- define "cluster-registry.caBundleMount" -}}
{{- if .Values.global.networkfunctionextension.artifactReconciler.caBundleConfigMap }}
- name: ca
  mountPath: /etc/cluster-registry/ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* Usage: include "cluster-registry.caBundleVolume" $ -> the volume holding the source registries' CA bundle, if any. */}}
{{- define "cluster-registry.caBundleVolume" -}}
{{- with .Values.global.networkfunctionextension.artifactReconciler.caBundleConfigMap }}
- name: ca
  configMap:
    name: {{ . }}
{{- end }}
{{- end -}}
