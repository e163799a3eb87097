{{/* ray-cluster names; the shared helpers live in the tulpar-lib library chart. */}}
{{- define "ray-cluster.fullname" -}}
{{- include "tulpar.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "ray-cluster.configMap" -}}
{{- printf "%s-configs" (include "ray-cluster.fullname" .) }}
{{- end }}

{{/* The repo's configs/ tree as a dict (mounted at /configs on every Ray pod). */}}
{{- define "ray-cluster.configFiles" -}}
{{- include "tulpar.configFiles" (dict "ctx" .) }}
{{- end }}
