{{/* tulpar platform names; the shared helpers live in the tulpar-lib library chart. */}}

{{/* <fullname>-<component>, e.g. tulpar-mlflow for the release "tulpar". */}}
{{- define "tulpar.component" -}}
{{- printf "%s-%s" (include "tulpar.fullname" .ctx | trunc 45 | trimSuffix "-") .component }}
{{- end }}

{{- define "tulpar.postgresSecret" -}}
{{- .Values.postgresql.auth.existingSecret | default (printf "%s-postgres" (include "tulpar.fullname" .)) }}
{{- end }}

{{- define "tulpar.s3Secret" -}}
{{- .Values.s3.existingSecret | default (printf "%s-s3" (include "tulpar.fullname" .)) }}
{{- end }}

{{- define "tulpar.postgresHost" -}}
{{- if .Values.postgresql.enabled }}
{{- include "tulpar.component" (dict "ctx" . "component" "postgresql") }}
{{- else }}
{{- required "postgresql.external.host is required when postgresql.enabled=false (your managed PostgreSQL)" .Values.postgresql.external.host }}
{{- end }}
{{- end }}

{{- define "tulpar.postgresPort" -}}
{{- ternary 5432 .Values.postgresql.external.port .Values.postgresql.enabled }}
{{- end }}

{{- define "tulpar.s3Endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "http://%s:9000" (include "tulpar.component" (dict "ctx" . "component" "minio")) }}
{{- else }}
{{- .Values.s3.endpointUrl }}
{{- end }}
{{- end }}

{{- define "tulpar.mlflowUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "tulpar.component" (dict "ctx" . "component" "mlflow")) .Release.Namespace .Values.mlflow.port }}
{{- end }}

{{/* S3 settings shared by MLflow and the bucket job: endpoint, region, credentials from the Secret. */}}
{{- define "tulpar.s3Env" -}}
{{- with include "tulpar.s3Endpoint" . }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "tulpar.s3Secret" . }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "tulpar.s3Secret" . }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}

{{/* A pod's writable scratch: the root filesystem is read-only. */}}
{{- define "tulpar.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ . | default "1Gi" }}
{{- end }}
