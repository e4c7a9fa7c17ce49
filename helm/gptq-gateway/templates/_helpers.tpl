{{/*
Names, labels and the pieces shared by several templates.
*/}}

{{- define "gptq-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release-wide name prefix. Truncated to 45 characters so that the longest suffix this chart
appends ("-quantize-" plus an 8-character hash) still fits the 63-character name limit.
*/}}
{{- define "gptq-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gptq-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gptq-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gptq-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gptq-gateway.labels" -}}
helm.sh/chart: {{ include "gptq-gateway.chart" . }}
{{ include "gptq-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gptq-gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component; call with (dict "root" $ "component" "engine"). */}}
{{- define "gptq-gateway.componentLabels" -}}
{{ include "gptq-gateway.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "gptq-gateway.componentSelectorLabels" -}}
{{ include "gptq-gateway.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "gptq-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gptq-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: by digest when one is given, else by tag (default: appVersion). */}}
{{- define "gptq-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "gptq-gateway.engineName" -}}
{{- printf "%s-engine" (include "gptq-gateway.fullname" .) }}
{{- end }}

{{- define "gptq-gateway.shimName" -}}
{{- printf "%s-shim" (include "gptq-gateway.fullname" .) }}
{{- end }}

{{- define "gptq-gateway.httpServiceName" -}}
{{- printf "%s-http" (include "gptq-gateway.fullname" .) }}
{{- end }}

{{- define "gptq-gateway.configMapName" -}}
{{- printf "%s-config" (include "gptq-gateway.fullname" .) }}
{{- end }}

{{- define "gptq-gateway.claimName" -}}
{{- default (printf "%s-models" (include "gptq-gateway.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{- define "gptq-gateway.secretName" -}}
{{- default (printf "%s-api-keys" (include "gptq-gateway.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Absolute path of the checkpoint directory the engine serves and the quantize Job writes. */}}
{{- define "gptq-gateway.checkpointPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.dir) }}
{{- end }}

{{/* Where the API-key Secret is mounted in the engine and shim containers. */}}
{{- define "gptq-gateway.keysDir" -}}
/etc/gptq-gateway/keys
{{- end }}

{{/*
The address the shim dials. In sidecar mode the engine is in the same pod; otherwise the engine's
ClusterIP Service, unless shim.upstream names another address.
*/}}
{{- define "gptq-gateway.upstream" -}}
{{- if eq .Values.shim.mode "sidecar" }}
{{- printf "127.0.0.1:%d" (int .Values.engine.grpcPort) }}
{{- else }}
{{- default (printf "%s:%d" (include "gptq-gateway.engineName" .) (int .Values.engine.service.port)) .Values.shim.upstream }}
{{- end }}
{{- end }}

{{/*
The engine's grace period: what the values ask for, else preStop sleep + drain + a margin for the
process to exit. Rendering fails when an explicit value would cut the drain short.
*/}}
{{- define "gptq-gateway.engineGracePeriod" -}}
{{- $needed := add .Values.engine.drainTimeoutSeconds .Values.engine.preStopSleepSeconds }}
{{- if .Values.engine.terminationGracePeriodSeconds }}
{{- if le (int .Values.engine.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "engine.terminationGracePeriodSeconds (%d) must exceed engine.drainTimeoutSeconds + engine.preStopSleepSeconds (%d), or the engine is killed before it has drained" (int .Values.engine.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- .Values.engine.terminationGracePeriodSeconds }}
{{- else }}
{{- add $needed 15 }}
{{- end }}
{{- end }}

{{/* Checks that cannot be written in values.schema.json because they span several values. */}}
{{- define "gptq-gateway.validate" -}}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.keys) }}
{{- fail "auth.enabled is true but auth.keys is empty and auth.existingSecret is not set: give at least one key, or the name of a Secret holding them" }}
{{- end }}
{{- if and .Values.quantize.enabled (not .Values.quantize.model) }}
{{- fail "quantize.enabled is true but quantize.model is empty: give a Hugging Face model id or a path inside the model volume" }}
{{- end }}
{{- if and (eq .Values.shim.mode "sidecar") .Values.shim.upstream }}
{{- fail "shim.upstream cannot be set when shim.mode is sidecar: the sidecar always dials the engine in its own pod" }}
{{- end }}
{{- if and .Values.engine.autoscaling.enabled (gt (int .Values.engine.autoscaling.minReplicas) (int .Values.engine.autoscaling.maxReplicas)) }}
{{- fail "engine.autoscaling.minReplicas must not exceed engine.autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.shim.autoscaling.enabled (gt (int .Values.shim.autoscaling.minReplicas) (int .Values.shim.autoscaling.maxReplicas)) }}
{{- fail "shim.autoscaling.minReplicas must not exceed shim.autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.shim.autoscaling.enabled (ne .Values.shim.mode "deployment") }}
{{- fail "shim.autoscaling.enabled needs shim.mode deployment: a sidecar scales with the engine" }}
{{- end }}
{{- end }}

{{/* Environment shared by the app's containers: writable cache locations and config.env. */}}
{{- define "gptq-gateway.envFrom" -}}
- configMapRef:
    name: {{ include "gptq-gateway.configMapName" .root }}
{{- end }}

{{/*
Volumes every app pod needs because the root filesystem is read-only: /tmp and the home
directory, where torch, Triton, CUDA and Hugging Face keep their caches.
Call with (dict "cacheSizeLimit" "8Gi").
*/}}
{{- define "gptq-gateway.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
- name: home
  emptyDir:
    sizeLimit: {{ .cacheSizeLimit }}
{{- end }}

{{- define "gptq-gateway.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/gptqgw
{{- end }}

{{/* The API-key Secret as a volume: `items` picks the keys this pod needs. */}}
{{- define "gptq-gateway.keysVolume" -}}
- name: api-keys
  secret:
    secretName: {{ include "gptq-gateway.secretName" .root }}
    defaultMode: 0440
    items:
      {{- range .keys }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}

{{/* The shim container, shared by its own Deployment and the sidecar form. */}}
{{- define "gptq-gateway.shimContainer" -}}
{{- $root := . -}}
- name: shim
  image: {{ include "gptq-gateway.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  {{- if eq $root.Values.shim.mode "sidecar" }}
  # A sidecar (restartable init container) starts before the engine and stops after it, so
  # streams that the engine is still draining keep their HTTP connection until they finish.
  restartPolicy: Always
  {{- end }}
  args:
    - openai
    - --upstream={{ include "gptq-gateway.upstream" $root }}
    - --host={{ $root.Values.listenHost }}
    - --port={{ $root.Values.shim.port }}
    {{- if $root.Values.auth.enabled }}
    - --api-keys-file={{ include "gptq-gateway.keysDir" $root }}/{{ $root.Values.auth.apiKeysKey }}
    - --upstream-api-key-file={{ include "gptq-gateway.keysDir" $root }}/{{ $root.Values.auth.upstreamKeyKey }}
    {{- end }}
    - --log-format={{ $root.Values.shim.logFormat }}
    - --log-level={{ $root.Values.shim.logLevel }}
    {{- range $root.Values.shim.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  ports:
    - name: http
      containerPort: {{ $root.Values.shim.port }}
      protocol: TCP
  envFrom:
    {{- include "gptq-gateway.envFrom" (dict "root" $root) | nindent 4 }}
  {{- with $root.Values.shim.extraEnv }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  startupProbe:
    httpGet:
      path: /health
      port: http
    {{- toYaml $root.Values.shim.startupProbe | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /health
      port: http
    {{- toYaml $root.Values.shim.livenessProbe | nindent 4 }}
  readinessProbe:
    # /ready reports the upstream engine's health, so a shim whose engine is gone leaves the Service.
    httpGet:
      path: /ready
      port: http
    {{- toYaml $root.Values.shim.readinessProbe | nindent 4 }}
  {{- if ne $root.Values.shim.mode "sidecar" }}
  lifecycle:
    preStop:
      # Stay up while endpoints controllers and proxies stop sending new requests here. (A sidecar
      # needs no wait: it is stopped only after the engine has drained.)
      sleep:
        seconds: {{ $root.Values.shim.preStopSleepSeconds }}
  {{- end }}
  resources:
    {{- toYaml $root.Values.shim.resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    {{- include "gptq-gateway.scratchMounts" $root | nindent 4 }}
    {{- if $root.Values.auth.enabled }}
    - name: api-keys
      mountPath: {{ include "gptq-gateway.keysDir" $root }}
      readOnly: true
    {{- end }}
{{- end }}

{{/*
Checkov skips shared by every workload, each with the reason it does not apply; rendered as
annotations, so checkov run on the live objects reads the same reasons.
*/}}
{{- define "gptq-gateway.checkovSkips" -}}
{{- if not .Values.image.digest -}}
checkov.io/skip1: "CKV_K8S_43=The image is built by each user from this repository, so the chart cannot know a digest; set image.digest to pin one"
{{- end }}
{{- end }}
