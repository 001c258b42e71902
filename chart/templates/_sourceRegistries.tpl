{{/* How both reconcilers reach the source registries: plain-HTTP list and CA bundle. */}}

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
