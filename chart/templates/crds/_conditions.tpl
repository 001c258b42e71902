{{/* Schema parts shared by both CRDs. */}}

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
