{{/* ray-job names and the job's command; the shared helpers live in the tulpar-lib library chart. */}}

{{/* The RayJob name: .Values.name, or <stage>-<config> (pipelines.submit adds a unique suffix). Kept short: KubeRay
     derives the RayCluster, Service and submitter Job names from it. */}}
{{- define "ray-job.name" -}}
{{- $name := .Values.name | default (printf "%s-%s" .Values.stage .Values.config) }}
{{- regexReplaceAll "[^a-z0-9-]+" (lower $name) "-" | trunc 40 | trimSuffix "-" | trimPrefix "-" }}
{{- end }}

{{- define "ray-job.configMap" -}}
{{- printf "%s-configs" (include "ray-job.name" .) }}
{{- end }}

{{/* configs/<stage>/<config>.yaml relative to configs/ */}}
{{- define "ray-job.configPath" -}}
{{- printf "%s/%s.yaml" .Values.stage .Values.config }}
{{- end }}

{{/* All configs (the chart's configs symlink) plus .Values.configContent for this stage's config, if given. */}}
{{- define "ray-job.configFiles" -}}
{{- $override := dict }}
{{- if .Values.configContent }}
{{- $_ := set $override (include "ray-job.configPath" .) .Values.configContent }}
{{- end }}
{{- include "tulpar.configFiles" (dict "ctx" . "override" $override) }}
{{- end }}

{{/* The same command as on a laptop (`make <stage> CONFIG=<config> ARGS=...`), with the config mounted at /configs. */}}
{{- define "ray-job.entrypoint" -}}
{{- $parts := list "python" "-m" (printf "jobs.%s" .Values.stage) "--config" (printf "/configs/%s" (include "ray-job.configPath" .)) }}
{{- range .Values.overrides }}
{{- $parts = append $parts (squote .) }}
{{- end }}
{{- join " " $parts }}
{{- end }}
