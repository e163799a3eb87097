{{/* Names ------------------------------------------------------------------------------------------------ */}}
{{- define "tulpar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tulpar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tulpar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object; selectorLabels are the immutable subset used by selectors. */}}
{{- define "tulpar.labels" -}}
helm.sh/chart: {{ include "tulpar.chart" . }}
{{ include "tulpar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | default .Chart.Version | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tulpar
{{- end }}

{{- define "tulpar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tulpar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Component labels: (dict "ctx" $ "component" "mlflow") */}}
{{- define "tulpar.componentLabels" -}}
{{ include "tulpar.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tulpar.componentSelectorLabels" -}}
{{ include "tulpar.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Images: (dict "image" .Values.image "what" "image") -> repository:tag or repository@digest */}}
{{- define "tulpar.image" -}}
{{- $img := .image | default dict }}
{{- $what := .what | default "image" }}
{{- if not $img.repository }}
{{- fail (printf "%s.repository is required (the container image to run, e.g. ghcr.io/tulpar-ai/tulpar-train)" $what) }}
{{- end }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else if $img.tag }}
{{- printf "%s:%s" $img.repository (toString $img.tag) }}
{{- else }}
{{- fail (printf "%s.tag (or %s.digest) is required: pin the image version, never a floating tag" $what $what) }}
{{- end }}
{{- end }}

{{/* Security contexts: the chart's values, which default to the hardened settings below. */}}
{{- define "tulpar.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .runAsUser | default 10001 }}
runAsGroup: {{ .runAsGroup | default 10001 }}
fsGroup: {{ .fsGroup | default 10001 }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "tulpar.securityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ if hasKey . "readOnlyRootFilesystem" }}{{ .readOnlyRootFilesystem }}{{ else }}true{{ end }}
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The platform settings every stage reads (docs/architecture.md), from .Values.settings.
     S3 credentials come from an existing Secret; values only ever name the Secret. */}}
{{- define "tulpar.settingsEnv" -}}
{{- $s := .Values.settings }}
- name: TULPAR_HOME
  value: {{ $s.home | quote }}
- name: TULPAR_DATA
  value: {{ $s.data | quote }}
{{- if $s.storage }}
- name: TULPAR_STORAGE
  value: {{ $s.storage | quote }}
{{- end }}
- name: MLFLOW_TRACKING_URI
  value: {{ required "settings.mlflowTrackingUri is required (e.g. http://tulpar-mlflow.tulpar.svc:5000)" $s.mlflowTrackingUri | quote }}
- name: PYTHONUNBUFFERED
  value: "1"
{{- with $s.s3 }}
{{- if .endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ .endpointUrl | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ .endpointUrl | quote }}
{{- end }}
{{- if .region }}
- name: AWS_DEFAULT_REGION
  value: {{ .region | quote }}
{{- end }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .accessKeyIdKey | default "AWS_ACCESS_KEY_ID" }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .secretAccessKeyKey | default "AWS_SECRET_ACCESS_KEY" }}
{{- end }}
{{- end }}
{{- with $s.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
