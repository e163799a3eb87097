{{/* The repo's configs/ tree, reached through each chart's `configs` symlink (charts/<chart>/configs ->
     ../../configs), as ConfigMap data. ConfigMap keys cannot hold "/", so configs/pretrain/tiny.yaml is stored
     under the key pretrain__tiny.yaml and mounted back at /configs/pretrain/tiny.yaml (tulpar.configItems).
     Call with (dict "ctx" $ "override" (dict "pretrain/tiny.yaml" "<yaml text>")); an override replaces or adds
     one file (e.g. a config passed with --set-file). */}}
{{- define "tulpar.configFiles" -}}
{{- $files := dict }}
{{- range $path, $_ := .ctx.Files.Glob "configs/**.yaml" }}
{{- $_ := set $files (trimPrefix "configs/" $path) ($.ctx.Files.Get $path) }}
{{- end }}
{{- range $rel, $text := (.override | default dict) }}
{{- $_ := set $files $rel $text }}
{{- end }}
{{- toJson $files }}
{{- end }}

{{/* Both take (dict "files" <the dict from tulpar.configFiles | fromJson>). */}}
{{- define "tulpar.configMapData" -}}
{{- if gt (len (toJson .files)) 900000 }}
{{- fail "configs/ is over 900 kB: a ConfigMap holds at most 1 MiB; keep data out of configs/ (TULPAR_DATA, s3://)" }}
{{- end }}
{{- range $rel, $text := .files }}
{{ replace "/" "__" $rel }}: |-
{{ $text | trimSuffix "\n" | indent 2 }}
{{- end }}
{{- end }}

{{- define "tulpar.configItems" -}}
{{- range $rel, $_ := .files }}
- key: {{ replace "/" "__" $rel }}
  path: {{ $rel }}
{{- end }}
{{- end }}
