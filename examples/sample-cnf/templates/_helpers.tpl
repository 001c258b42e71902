{{/* Image reference: {{ include "sample-cnf.image" (list . "frontend") }} */}}
{{- define "sample-cnf.image" -}}
{{- $root := index . 0 -}}
{{- printf "%s/%s" $root.Values.registry (index $root.Values.images (index . 1)) -}}
{{- end -}}

{{/* Common labels: {{ include "sample-cnf.labels" (list . "frontend") }} */}}
{{- define "sample-cnf.labels" -}}
app.kubernetes.io/name: {{ index . 1 }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/part-of: sample-cnf
{{- end -}}

{{/* Placement of every pod: {{ include "sample-cnf.placement" . | nindent 6 }} */}}
{{- define "sample-cnf.placement" -}}
{{- with .Values.nodeSelector -}}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
