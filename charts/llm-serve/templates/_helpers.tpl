{{/* llm-serve names and the Serve config; the shared helpers live in the tulpar-lib library chart. */}}
{{- define "llm-serve.fullname" -}}
{{- include "tulpar.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* The args handed to services.llm_serve.app:build_app: a services.llm_serve.config.ServeConfig (the same schema as
     configs/serve/*.yaml for `make serve`), built from the values. */}}
{{- define "llm-serve.appArgs" -}}
{{- $m := .Values.model }}
{{- $s := .Values.serve }}
{{- $auto := dict "min_replicas" $m.autoscaling.minReplicas "max_replicas" $m.autoscaling.maxReplicas "target_ongoing_requests" $m.autoscaling.targetOngoingRequests }}
{{- if $m.autoscaling.initialReplicas }}
{{- $_ := set $auto "initial_replicas" $m.autoscaling.initialReplicas }}
{{- end }}
{{- $model := dict
      "source" (required "model.uri is required: a registered model, e.g. models:/tulpar-tiny@champion" $m.uri)
      "dtype" $m.dtype
      "gpu_memory_utilization" $m.gpuMemoryUtilization
      "tensor_parallel_size" (int $m.tensorParallelSize)
      "quantization" $m.quantization
      "autoscaling" $auto
      "engine_kwargs" $m.engineArgs }}
{{- with $m.servedName }}{{ $_ := set $model "served_name" . }}{{ end }}
{{- with $m.maxModelLen }}{{ $_ := set $model "max_model_len" (int .) }}{{ end }}
{{- $args := dict "models" (list $model) "use_gpu" $s.useGpu "app_name" $s.appName "host" "0.0.0.0" "port" 8000 }}
{{- if $s.useGpu }}
{{- with $s.acceleratorType }}{{ $_ := set $args "accelerator_type" . }}{{ end }}
{{- else }}
{{- $_ := set $args "cpus_per_replica" $s.cpusPerReplica }}
{{- end }}
{{- toYaml (mergeOverwrite $args $s.extraArgs) }}
{{- end }}

{{- define "llm-serve.serveConfig" -}}
{{- $s := .Values.serve }}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: 8000
applications:
  - name: {{ $s.appName }}
    route_prefix: {{ $s.routePrefix }}
    import_path: {{ $s.importPath }}
    args:
      {{- include "llm-serve.appArgs" . | nindent 6 }}
{{- end }}

{{/* Replicas x GPUs must fit in the GPU worker groups at their maximum, or the autoscaler can never place them. */}}
{{- define "llm-serve.checkCapacity" -}}
{{- $a := .Values.model.autoscaling }}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) }}
{{- fail (printf "model.autoscaling.minReplicas (%v) is above maxReplicas (%v)" $a.minReplicas $a.maxReplicas) }}
{{- end }}
{{- if .Values.serve.useGpu }}
{{- $need := mul (int $a.maxReplicas) (int .Values.model.tensorParallelSize) }}
{{- $have := 0 }}
{{- range .Values.workerGroups }}
{{- $have = add $have (mul (int .maxReplicas) (int (.gpus | default 0))) }}
{{- end }}
{{- if gt $need $have }}
{{- fail (printf "model.autoscaling.maxReplicas x model.tensorParallelSize = %d GPUs, but the worker groups can grow to %d GPUs: raise workerGroups[].maxReplicas or lower model.autoscaling.maxReplicas" $need $have) }}
{{- end }}
{{- end }}
{{- end }}
