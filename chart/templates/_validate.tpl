{{/*
Usage: include "cluster-registry.validate" $ (from templates/validate.yaml) -> nothing, or `fail` with a clear message.
Every value combination the schema cannot express is rejected here, in one place.
*/}}
{{- define "cluster-registry.validate" -}}
{{- $v := .Values.global.networkfunctionextension -}}
{{- $r := $v.clusterRegistry -}}
{{- $p := "global.networkfunctionextension" -}}
{{- /* matchConditions are GA in 1.30. A development build reports v0.0.0-master: unknown, not refused. */ -}}
{{- $kube := .Capabilities.KubeVersion.Version -}}
{{- if and (not (hasPrefix "v0.0.0" $kube)) (semverCompare "<1.30.0-0" $kube) -}}
{{- fail (printf "cluster-registry needs Kubernetes 1.30 or later (webhook matchConditions); this cluster is %s" $kube) -}}
{{- end -}}
{{- if and $v.enableEarlyLoading (not $v.enableClusterRegistry) -}}
{{- fail (printf "%s.enableEarlyLoading=true needs %s.enableClusterRegistry=true: images are preloaded into the cluster registry" $p $p) -}}
{{- end -}}
{{- if and $v.enableLocalRegistry (not $v.enableClusterRegistry) -}}
{{- fail (printf "%s.enableLocalRegistry=true needs %s.enableClusterRegistry=true: side-loaded images are imported into the cluster registry" $p $p) -}}
{{- end -}}
{{- if and $r.highAvailability.enabled (eq $r.storage.driver "filesystem") (eq $r.storageAccessMode "ReadWriteOnce") -}}
{{- fail (printf "%s.clusterRegistry.highAvailability.enabled=true needs ReadWriteMany storage: %s.clusterRegistry.storageAccessMode=ReadWriteOnce cannot be mounted by 3 replicas on different nodes (use ReadWriteMany, object storage, or turn HA off)" $p $p) -}}
{{- end -}}
{{- if and (ne $r.storage.driver "filesystem") $r.existingClaim -}}
{{- fail (printf "%s.clusterRegistry.existingClaim is only used with storage.driver=filesystem, not %s" $p $r.storage.driver) -}}
{{- end -}}
{{- if and (eq $r.storage.driver "s3") (or (not $r.storage.s3.bucket) (not $r.storage.s3.region)) -}}
{{- fail (printf "%s.clusterRegistry.storage.driver=s3 needs storage.s3.bucket and storage.s3.region" $p) -}}
{{- end -}}
{{- if and (eq $r.storage.driver "azure") (or (not $r.storage.azure.accountName) (not $r.storage.azure.container)) -}}
{{- fail (printf "%s.clusterRegistry.storage.driver=azure needs storage.azure.accountName and storage.azure.container" $p) -}}
{{- end -}}
{{- if and (ne $r.registryService.type "NodePort") (gt (int $r.registryService.nodePort) 0) -}}
{{- fail (printf "%s.clusterRegistry.registryService.nodePort is set but registryService.type is %s, not NodePort" $p $r.registryService.type) -}}
{{- end -}}
{{- if and $v.webhook.url (not (hasPrefix "https://" $v.webhook.url)) -}}
{{- fail (printf "%s.webhook.url must be an https:// URL (the API server only calls webhooks over TLS), not %q" $p $v.webhook.url) -}}
{{- end -}}
{{- if and $v.webhook.caBundle (not $v.webhook.url) -}}
{{- fail (printf "%s.webhook.caBundle is only used in URL mode (%s.webhook.url); in-cluster TLS is managed by webhook.tls.mode" $p $p) -}}
{{- end -}}
{{- if and (eq $v.webhook.tls.mode "certManager") $v.webhook.tls.certManager.issuerRef.name (eq $v.webhook.tls.certManager.issuerRef.kind "") -}}
{{- fail (printf "%s.webhook.tls.certManager.issuerRef.kind must be set with issuerRef.name" $p) -}}
{{- end -}}
{{- if and $v.enableClusterRegistry $v.registryTLS.enabled (not (include "cluster-registry.hookTLS" .)) -}}
{{- fail (printf "%s.registryTLS.enabled=true needs the in-cluster webhook with %s.webhook.tls.mode=hook: the registry's certificate is issued from that CA by the certs Job (or set registryTLS.enabled=false: plain HTTP, docs/security.md)" $p $p) -}}
{{- end -}}
{{- if and $v.enableClusterRegistry $v.registryTLS.enabled (not $v.nodeProxy.enabled) (not $v.webhook.registryHost) -}}
{{- fail (printf "%s.registryTLS.enabled=true with %s.nodeProxy.enabled=false needs %s.webhook.registryHost: nodes would pull the Service over TLS without trusting the chart's CA (keep the node proxy, which speaks TLS for them, or name a host the nodes trust)" $p $p $p) -}}
{{- end -}}
{{- if and (not $v.enableClusterRegistry) $v.webhook.url -}}
{{- fail (printf "%s.webhook.url is set but %s.enableClusterRegistry=false deploys no webhook configuration" $p $p) -}}
{{- end -}}
{{- /* The registry volume is fixed after install. `lookup` sees the live PVC on install/upgrade only (under
`helm template` it returns nothing, so GitOps renders stay stable and the validate hook is the guard there);
failing here puts the reason in helm's own output instead of a failed hook Job's. */ -}}
{{- if and $v.enableClusterRegistry (eq $r.storage.driver "filesystem") (not $r.existingClaim) -}}
{{- $pvc := lookup "v1" "PersistentVolumeClaim" .Release.Namespace (include "cluster-registry.claimName" .) -}}
{{- $live := dig "spec" "resources" "requests" "storage" "" $pvc -}}
{{- if and $live (ne (include "cluster-registry.quantityBytes" $live) (include "cluster-registry.quantityBytes" $r.storageSize)) -}}
{{- fail (printf "%s.clusterRegistry.storageSize cannot be modified after the initial deployment: the registry volume %s is %s and the new value is %s; set it back to %s" $p $pvc.metadata.name $live $r.storageSize $live) -}}
{{- end -}}
{{- $liveClass := dig "spec" "storageClassName" "" $pvc -}}
{{- if and $pvc $r.storageClassName (ne $liveClass $r.storageClassName) -}}
{{- fail (printf "%s.clusterRegistry.storageClassName cannot be modified after the initial deployment: the registry volume %s uses %q and the new value is %q; set it back to %q" $p $pvc.metadata.name $liveClass $r.storageClassName $liveClass) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Usage: include "cluster-registry.quantityBytes" "100Gi" -> "107374182400" (binary and decimal suffixes, or none), to
compare a PVC's size as the API server writes it ("1Ti") with the value as given ("1024Gi"). */}}
{{- define "cluster-registry.quantityBytes" -}}
{{- $q := toString . -}}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 -}}
{{- $n := regexFind "^[0-9]+" $q -}}
{{- $unit := trimPrefix $n $q -}}
{{- mul (int64 $n) (int64 (get $units $unit | default 1)) -}}
{{- end -}}
