{{/* The registry: distribution's config, storage, resources, and how pods and nodes reach it. */}}

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
    {{- with $r.storage.azure.serviceURL }}
    serviceurl: {{ . | quote }}
    {{- end }}
    {{- /* Without slashes: the driver's health check stats the root, and "/" names the empty blob, which
    Azure refuses (400); after 3 failures distribution answers every request with 503. */}}
    rootdirectory: {{ trimAll "/" $r.storage.azure.rootDirectory | quote }}
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
  # distribution serves every byte itself; who may do what is decided by the token service's JWTs,
  # which it verifies (auth below): no Python in the data path.
  addr: 0.0.0.0:5000
  relativeurls: true
  {{- if include "cluster-registry.registryTLS" . }}
  # The serving certificate from the chart's CA (registryTLS), read at start: a renewal restarts the pods.
  tls:
    certificate: /etc/distribution/tls/tls.crt
    key: /etc/distribution/tls/tls.key
    minimumtls: tls1.2
  {{- end }}
  # On SIGTERM, finish in-flight pulls and pushes for up to a minute (the pod's grace period allows it).
  draintimeout: 60s
  headers:
    X-Content-Type-Options:
      - nosniff
  # Loopback only: /debug/pprof and /debug/vars stay inside the pod; the token service relays /metrics
  # and the health check (port 5002).
  debug:
    addr: 127.0.0.1:5001
    prometheus:
      enabled: true
      path: /metrics
auth:
  token:
    realm: {{ include "cluster-registry.tokenRealm" . | quote }}
    service: cluster-registry
    issuer: cluster-registry-token-service
    jwks: /etc/distribution/token/jwks.json
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

{{/* Usage: include "cluster-registry.registryResources" $ -> requests/limits of the distribution container from registryService.scale. */}}
{{- define "cluster-registry.registryResources" -}}
{{- $sizes := dict
  "small" (dict "requests" (dict "cpu" "100m" "memory" "250Mi") "limits" (dict "cpu" "100m" "memory" "2Gi"))
  "medium" (dict "requests" (dict "cpu" "250m" "memory" "500Mi") "limits" (dict "cpu" "500m" "memory" "2Gi"))
  "large" (dict "requests" (dict "cpu" "500m" "memory" "1Gi") "limits" (dict "cpu" "1" "memory" "4Gi")) -}}
{{- toYaml (get $sizes .Values.global.networkfunctionextension.clusterRegistry.registryService.scale) -}}
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

{{/* Usage: include "cluster-registry.registryServiceHost" $ -> "<svc>.<ns>.svc:<port>", how pods in the cluster reach the registry. */}}
{{- define "cluster-registry.registryServiceHost" -}}
{{- printf "%s.%s.svc:%d" (include "cluster-registry.componentName" (dict "ctx" . "component" "registry")) .Release.Namespace (int .Values.global.networkfunctionextension.clusterRegistry.registryService.port) -}}
{{- end -}}

{{/* Usage: include "cluster-registry.registryHost" $ -> the rewrite target as nodes pull it (webhook.registryHost, the node proxy's 127.0.0.1:<port>, localhost:<nodePort>, or the Service DNS name). */}}
{{- define "cluster-registry.registryHost" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- $svc := $v.clusterRegistry.registryService -}}
{{- if $v.webhook.registryHost -}}
{{- $v.webhook.registryHost -}}
{{- else if $v.nodeProxy.enabled -}}
{{- printf "127.0.0.1:%d" (int $v.nodeProxy.port) -}}
{{- else if and (eq $svc.type "NodePort") (gt (int $svc.nodePort) 0) -}}
{{- printf "localhost:%d" (int $svc.nodePort) -}}
{{- else -}}
{{- printf "%s.%s.svc.cluster.local:%d" (include "cluster-registry.componentName" (dict "ctx" . "component" "registry")) .Release.Namespace (int $svc.port) -}}
{{- end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.tokenSecret" $ -> the Secret with the token signing key (key.pem) and the keys distribution trusts (jwks.json). */}}
{{- define "cluster-registry.tokenSecret" -}}
{{- printf "%s-token" (include "cluster-registry.componentName" (dict "ctx" . "component" "registry")) -}}
{{- end -}}

{{/* Usage: include "cluster-registry.pushSecret" (dict "ctx" $ "component" "gc") -> the component's own push credential Secret (credentials.yaml). */}}
{{- define "cluster-registry.pushSecret" -}}
{{- printf "%s-push-%s" (include "cluster-registry.componentName" (dict "ctx" .ctx "component" "registry")) .component -}}
{{- end -}}

{{/* Usage: include "cluster-registry.pushers" $ -> the components with a push credential, space-separated. */}}
{{- define "cluster-registry.pushers" -}}artifact-reconciler sideload gc{{- end -}}

{{/* Usage: include "cluster-registry.tokenServiceURL" $ -> "https://<svc>.<ns>.svc:5002/token" (http:// without registryTLS), the token service as pods reach it. */}}
{{- define "cluster-registry.tokenServiceURL" -}}
{{- printf "%s://%s.%s.svc:5002/token" (include "cluster-registry.registryScheme" .) (include "cluster-registry.componentName" (dict "ctx" . "component" "registry")) .Release.Namespace -}}
{{- end -}}

{{/* Usage: include "cluster-registry.registryTLS" $ -> "true" when the registry Service serves TLS (registryTLS.enabled). */}}
{{- define "cluster-registry.registryTLS" -}}
{{- if .Values.global.networkfunctionextension.registryTLS.enabled }}true{{ end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.registryScheme" $ -> "https" or "http", how pods speak to the registry Service. */}}
{{- define "cluster-registry.registryScheme" -}}
{{- ternary "https" "http" (eq (include "cluster-registry.registryTLS" .) "true") -}}
{{- end -}}

{{/* Usage: include "cluster-registry.registryTLSSecret" $ -> the Secret with the registry's serving certificate (tls.crt, tls.key) and the CA bundle its clients trust (ca.crt). */}}
{{- define "cluster-registry.registryTLSSecret" -}}
{{- include "cluster-registry.componentName" (dict "ctx" . "component" "registry-tls") -}}
{{- end -}}

{{/* Usage: include "cluster-registry.registryCAPath" $ -> where a client pod finds the CA bundle the registry's certificate verifies against. */}}
{{- define "cluster-registry.registryCAPath" -}}/etc/cluster-registry/registry-ca/ca.crt{{- end -}}

{{/* Usage: include "cluster-registry.registryCAEnv" $ -> the env entry making the registry client trust the chart's CA (or nothing without registryTLS). */}}
{{- define "cluster-registry.registryCAEnv" -}}
{{- if include "cluster-registry.registryTLS" . }}
- name: CLUSTER_REGISTRY_CA_BUNDLE
  value: {{ include "cluster-registry.registryCAPath" . }}
{{- end }}
{{- end -}}

{{/* Usage: include "cluster-registry.registryCAMount" $ -> the volumeMount of the CA bundle (or nothing without registryTLS). */}}
{{- define "cluster-registry.registryCAMount" -}}
{{- if include "cluster-registry.registryTLS" . }}
- name: registry-ca
  mountPath: {{ dir (include "cluster-registry.registryCAPath" .) }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Usage: include "cluster-registry.registryCAVolume" $ -> the volume with the CA bundle alone (never the key), or nothing without registryTLS. */}}
{{- define "cluster-registry.registryCAVolume" -}}
{{- if include "cluster-registry.registryTLS" . }}
- name: registry-ca
  secret:
    secretName: {{ include "cluster-registry.registryTLSSecret" . }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end -}}

{{/* Usage: include "cluster-registry.tokenRealm" $ -> the realm distribution names: the node proxy's token port on the node's loopback (nodes pull there), else the Service. */}}
{{- define "cluster-registry.tokenRealm" -}}
{{- $p := .Values.global.networkfunctionextension.nodeProxy -}}
{{- if $p.enabled -}}
{{- printf "http://127.0.0.1:%d/token" (add1 (int $p.port)) -}}
{{- else -}}
{{- include "cluster-registry.tokenServiceURL" . -}}
{{- end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.registryClientEnv" $ -> the env entries of a pod that talks to the registry Service: ask the token
service by its Service when the registry names the node-local realm, and trust the chart's CA (with registryTLS; mount registryCAVolume). */}}
{{- define "cluster-registry.registryClientEnv" -}}
- name: CLUSTER_REGISTRY_TOKEN_REALMS
  value: {{ printf "%s=%s" (include "cluster-registry.tokenRealm" .) (include "cluster-registry.tokenServiceURL" .) | quote }}
{{- include "cluster-registry.registryCAEnv" . }}
{{- end -}}
