{{/* A KubeRay RayClusterSpec (ray.io/v1) shared by the ray-cluster, ray-job and llm-serve charts.
     Call with (dict "ctx" $ "configMap" "<name or empty>" "configFiles" <dict> "serve" true|false); configFiles is the
     dict from tulpar.configFiles, mounted at /configs from the ConfigMap `configMap`. Values read from the chart:
     image, imagePullSecrets, rayVersion, settings, storage, head, workerGroups, autoscaler, podSecurityContext,
     securityContext, serviceAccount. */}}
{{- define "tulpar.rayClusterSpec" -}}
{{- $args := . }}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
rayVersion: {{ $v.rayVersion | quote }}
{{- if $v.rayAuth.enabled }}
# Ray's token authentication: KubeRay generates the token into a Secret and hands it to the pods and the submitter.
authOptions:
  mode: token
{{- end }}
enableInTreeAutoscaling: {{ $v.autoscaler.enabled }}
{{- if $v.autoscaler.enabled }}
autoscalerOptions:
  upscalingMode: {{ $v.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ $v.autoscaler.idleTimeoutSeconds }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  resources:
    {{- toYaml $v.autoscaler.resources | nindent 4 }}
  securityContext:
    {{- include "tulpar.securityContext" $v.securityContext | nindent 4 }}
  env:
    - name: HOME
      value: /tmp
{{- end }}
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    dashboard-host: "0.0.0.0"
    {{- range $k, $val := $v.head.rayStartParams }}
    {{ $k }}: {{ $val | toString | quote }}
    {{- end }}
  template:
    {{- include "tulpar.rayPodTemplate" (dict "ctx" $ctx "group" $v.head "head" true "configMap" $args.configMap "configFiles" $args.configFiles "serve" $args.serve "gpus" 0) | nindent 4 }}
{{- if $v.workerGroups }}
workerGroupSpecs:
{{- range $g := $v.workerGroups }}
{{- if gt (int ($g.minReplicas | default 0)) (int $g.maxReplicas) }}
{{- fail (printf "workerGroups %q: minReplicas (%v) is above maxReplicas (%v)" $g.name $g.minReplicas $g.maxReplicas) }}
{{- end }}
{{- if gt (int ($g.replicas | default 0)) (int $g.maxReplicas) }}
{{- fail (printf "workerGroups %q: replicas (%v) is above maxReplicas (%v)" $g.name $g.replicas $g.maxReplicas) }}
{{- end }}
  - groupName: {{ $g.name }}
    replicas: {{ $g.replicas | default $g.minReplicas | default 0 }}
    minReplicas: {{ $g.minReplicas | default 0 }}
    maxReplicas: {{ $g.maxReplicas }}
    {{- $params := dict }}
    {{- if gt (int ($g.gpus | default 0)) 0 }}
    {{- $_ := set $params "num-gpus" ($g.gpus | toString) }}
    {{- end }}
    {{- range $k, $val := $g.rayStartParams }}
    {{- $_ := set $params $k ($val | toString) }}
    {{- end }}
    rayStartParams:
      {{- toYaml $params | nindent 6 }}
    template:
      {{- include "tulpar.rayPodTemplate" (dict "ctx" $ctx "group" $g "head" false "configMap" $args.configMap "configFiles" $args.configFiles "serve" $args.serve "gpus" ($g.gpus | default 0)) | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}

{{/* One Ray pod template (head or a worker group). */}}
{{- define "tulpar.rayPodTemplate" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
{{- $g := .group }}
{{- $gpus := int .gpus }}
{{- if and (gt $gpus 0) (not $g.nodeSelector) }}
{{- fail (printf "workerGroups %q asks for %d GPU(s) but has no nodeSelector: set workerGroups[].nodeSelector to your GPU node pool's label (e.g. cloud.google.com/gke-accelerator: nvidia-l4)" $g.name $gpus) }}
{{- end }}
metadata:
  labels:
    {{- include "tulpar.selectorLabels" $ctx | nindent 4 }}
    app.kubernetes.io/part-of: tulpar
    app.kubernetes.io/component: {{ ternary "ray-head" "ray-worker" .head }}
    {{- with $g.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := deepCopy ($g.annotations | default dict) }}
  {{- if $v.settings.s3.existingSecret }}
  {{- /* pyarrow/boto3 take S3 keys from the environment; they come from the Secret, never from values. */}}
  {{- $_ := set $annotations "checkov.io/skip1" "CKV_K8S_35=S3 clients read their keys from env vars set from a Secret" }}
  {{- end }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if $v.serviceAccount.name }}
  serviceAccountName: {{ $v.serviceAccount.name }}
  {{- end }}
  automountServiceAccountToken: {{ and .head $v.autoscaler.enabled }}
  securityContext:
    {{- include "tulpar.podSecurityContext" $v.podSecurityContext | nindent 4 }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ include "tulpar.image" (dict "image" $v.image "what" "image") }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      securityContext:
        {{- include "tulpar.securityContext" $v.securityContext | nindent 8 }}
      env:
        {{- include "tulpar.settingsEnv" $ctx | nindent 8 }}
        - name: HOME
          value: /tmp/home
        - name: XDG_CACHE_HOME
          value: /tmp/cache
      {{- if .head }}
      ports:
        - {containerPort: 6379, name: gcs-server}
        - {containerPort: 8265, name: dashboard}
        - {containerPort: 10001, name: client}
        - {containerPort: 8080, name: metrics}
        {{- if .serve }}
        - {containerPort: 8000, name: serve}
        {{- end }}
      {{- else if .serve }}
      ports:
        - {containerPort: 8000, name: serve}
        - {containerPort: 8080, name: metrics}
      {{- end }}
      resources:
        {{- $res := deepCopy ($g.resources | default dict) }}
        {{- if gt $gpus 0 }}
        {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" $gpus) ($res.requests | default dict)) }}
        {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $gpus) ($res.limits | default dict)) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      {{- /* Ray's own health endpoints: the raylet via the dashboard agent on every node, the GCS on the head,
             and Serve's proxy on serving workers (the same checks KubeRay injects by default). */}}
      livenessProbe:
        httpGet: {path: /api/local_raylet_healthz, port: 52365}
        initialDelaySeconds: 30
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 12
      readinessProbe:
        {{- if .head }}
        httpGet: {path: /api/gcs_healthz, port: 8265}
        {{- else if .serve }}
        httpGet: {path: /-/healthz, port: 8000}
        {{- else }}
        httpGet: {path: /api/local_raylet_healthz, port: 52365}
        {{- end }}
        initialDelaySeconds: 10
        periodSeconds: 5
        timeoutSeconds: 2
        failureThreshold: 10
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: shm, mountPath: /dev/shm}
        {{- if .configMap }}
        - {name: configs, mountPath: /configs, readOnly: true}
        {{- end }}
        {{- with $v.storage.checkpoints.existingClaim }}
        - {name: checkpoints, mountPath: {{ $v.storage.checkpoints.mountPath }}}
        {{- end }}
        {{- with $v.storage.data.existingClaim }}
        - {name: data, mountPath: {{ $v.storage.data.mountPath }}, readOnly: true}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ $v.storage.tmpSizeLimit }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.storage.shmSizeLimit }}
    {{- if .configMap }}
    - name: configs
      configMap:
        name: {{ .configMap }}
        items:
          {{- include "tulpar.configItems" (dict "files" .configFiles) | nindent 10 }}
    {{- end }}
    {{- with $v.storage.checkpoints.existingClaim }}
    - name: checkpoints
      persistentVolumeClaim:
        claimName: {{ . }}
    {{- end }}
    {{- with $v.storage.data.existingClaim }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ . }}
        readOnly: true
    {{- end }}
{{- end }}
