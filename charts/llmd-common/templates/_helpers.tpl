{{/*
Helpers shared by every llmd chart. A chart that uses them depends on llmd-common and keeps its
settings under the same value names: image, resources, podSecurityContext, securityContext,
nodeSelector, tolerations, affinity, podAnnotations, serviceMonitor.
*/}}

{{/* The release-scoped name of this component: <release>-<chart> (always, so that the charts of
one release can name each other's Services; the umbrella's aliases in kebab case: modelServer is
<release>-model-server), or fullnameOverride. */}}
{{- define "llmd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (.Chart.Name | kebabcase) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmd.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llmd.labels" -}}
{{ include "llmd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmd
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* repository:tag, the tag defaulting to the chart's appVersion; a digest wins over a tag. */}}
{{- define "llmd.image" -}}
{{- $img := .Values.image -}}
{{- $registry := $img.registry | default ((.Values.global).imageRegistry) | default "" -}}
{{- $repo := ternary $img.repository (printf "%s/%s" $registry $img.repository) (eq $registry "") -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo ($img.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Non-root, no privilege escalation, every capability dropped, read-only root filesystem. */}}
{{- define "llmd.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- with .Values.podSecurityContext }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "llmd.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- with .Values.securityContext }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Scheduling settings every pod spec takes. */}}
{{- define "llmd.podPlacement" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* HTTP liveness (/healthz) and readiness (/readyz) probes on the named port. */}}
{{- define "llmd.httpProbes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: {{ . }}}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: {{ . }}}
  periodSeconds: 5
  failureThreshold: 2
startupProbe:
  httpGet: {path: /healthz, port: {{ . }}}
  periodSeconds: 2
  failureThreshold: 60
{{- end -}}

{{/* A ServiceMonitor for the component's metrics port (Prometheus Operator). */}}
{{- define "llmd.serviceMonitor" -}}
{{- if .Values.serviceMonitor.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "llmd.fullname" . }}
  labels:
    {{- include "llmd.labels" . | nindent 4 }}
    {{- with .Values.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "llmd.selectorLabels" . | nindent 6 }}
  endpoints:
  - port: metrics
    path: /metrics
    interval: {{ .Values.serviceMonitor.interval }}
{{- end }}
{{- end -}}

{{/* OpenTelemetry exporter settings as the environment variables the services read. */}}
{{- define "llmd.otelEnv" -}}
{{- $otel := (.Values.global).otel | default dict -}}
{{- if $otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $otel.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ include "llmd.fullname" . | quote }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $otel.samplingRatio | default 0.1 | quote }}
{{- end }}
{{- end -}}

{{/* Shared values, each overridable per chart: pool name, model name, block size, hash seed, engine port. */}}
{{- define "llmd.poolName" -}}
{{- .Values.poolName | default ((.Values.global).poolName) | default .Release.Name -}}
{{- end -}}
{{- define "llmd.modelName" -}}
{{- .Values.modelName | default ((.Values.global).modelName) | default "" -}}
{{- end -}}
{{- define "llmd.blockSize" -}}
{{- .Values.blockSize | default ((.Values.global).blockSize) | default 16 -}}
{{- end -}}
{{- define "llmd.hashSeed" -}}
{{- $s := .Values.hashSeed -}}
{{- if kindIs "invalid" $s }}{{ $s = (.Values.global).hashSeed }}{{ end -}}
{{- if kindIs "invalid" $s }}{{ $s = "" }}{{ end -}}
{{- toString $s -}}
{{- end -}}
{{- define "llmd.enginePort" -}}
{{- .Values.enginePort | default ((.Values.global).enginePort) | default 8000 -}}
{{- end -}}
{{/* The model servers' Service, named the same from every chart of a release. */}}
{{- define "llmd.engineService" -}}
{{- printf "%s-engines" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of an engine pod: its pool (the scheduler's selector) and its variant (the autoscaler's). */}}
{{- define "llmd.engineLabels" -}}
llmd.ai/pool: {{ include "llmd.poolName" . }}
llm-d.ai/variant: {{ .Values.variant | default (include "llmd.fullname" .) }}
{{- end -}}

{{/* The Service in front of a pool's engines (the activator's upstream, the render URL). */}}
{{- define "llmd.engineServiceManifest" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "llmd.engineService" . }}
  labels:
    {{- include "llmd.labels" . | nindent 4 }}
spec:
  selector:
    llmd.ai/pool: {{ include "llmd.poolName" . }}
  ports:
  - {name: http, port: {{ include "llmd.enginePort" . }}, targetPort: http}
{{- end -}}
