{{/* image NAME: the rendered image reference for key NAME of .Values.images. Usage: include "cnf.image" (list . "app") */}}
{{- define "cnf.image" -}}
{{- $root := index . 0 -}}
{{- tpl (index $root.Values.images (index . 1)) $root -}}
{{- end -}}
