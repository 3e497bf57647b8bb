{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "kvindex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name prefix of every object: <release>-kvindex, or the release name when it already
contains the chart name. The picker's objects append "-picker", so keep room for it. */}}
{{- define "kvindex.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 56 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvindex.pickerName" -}}
{{- printf "%s-picker" (include "kvindex.fullname" .) -}}
{{- end -}}

{{- define "kvindex.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; pass (dict "ctx" $ "component" "scorer"). */}}
{{- define "kvindex.labels" -}}
helm.sh/chart: {{ include "kvindex.chart" .ctx }}
{{ include "kvindex.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: kvindex
{{- end -}}

{{- define "kvindex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvindex.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kvindex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvindex.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvindex.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The namespace discovery watches (and where its Role lives). */}}
{{- define "kvindex.discoveryNamespace" -}}
{{- default .Release.Namespace .Values.discovery.namespace -}}
{{- end -}}

{{/* The discovery label selector: discovery.labelSelector, else vllm.podLabels as k=v,k=v. */}}
{{- define "kvindex.discoverySelector" -}}
{{- if .Values.discovery.labelSelector -}}
{{- .Values.discovery.labelSelector -}}
{{- else -}}
{{- $pairs := list -}}
{{- range $k, $v := .Values.vllm.podLabels -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
{{- end -}}

{{- define "kvindex.scheme" -}}
{{- if .Values.tls.enabled -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* The Service URL of the scoring service, as the picker and peer replicas dial it. */}}
{{- define "kvindex.serviceURL" -}}
{{- printf "%s://%s.%s.svc:%d" (include "kvindex.scheme" .) (include "kvindex.fullname" .) .Release.Namespace (int .Values.service.port) -}}
{{- end -}}

{{- define "kvindex.authSecretName" -}}
{{- default (printf "%s-auth" (include "kvindex.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "kvindex.snapshotClaimName" -}}
{{- default (printf "%s-snapshot" (include "kvindex.fullname" .)) .Values.snapshot.file.persistentVolumeClaim.existingClaim -}}
{{- end -}}

{{/* A NetworkPolicy `from` list: the given peers, or nothing (= any source) when empty. */}}
{{- define "kvindex.peers" -}}
{{- if . }}
from:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Consistency checks, included by the service Deployment. */}}
{{- define "kvindex.validate" -}}
{{- if and .Values.zmq.bind.enabled (gt (int .Values.replicaCount) 1) -}}
{{- fail "zmq.bind.enabled needs replicaCount 1: a vLLM pod connecting through the Service reaches one replica only (use discovery for several replicas)" -}}
{{- end -}}
{{- if and .Values.snapshot.file.enabled (eq .Values.snapshot.file.volumeType "persistentVolumeClaim") (gt (int .Values.replicaCount) 1) -}}
{{- fail "snapshot.file.volumeType persistentVolumeClaim needs replicaCount 1 (one writer per snapshot file); use warmFromPeers or emptyDir with several replicas" -}}
{{- end -}}
{{- if and .Values.snapshot.file.enabled (not (has .Values.snapshot.file.volumeType (list "emptyDir" "persistentVolumeClaim"))) -}}
{{- fail "snapshot.file.volumeType must be emptyDir or persistentVolumeClaim" -}}
{{- end -}}
{{- if and .Values.discovery.enabled (not (include "kvindex.discoverySelector" .)) -}}
{{- fail "discovery.enabled needs discovery.labelSelector or vllm.podLabels" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- if and .Values.picker.enabled .Values.picker.tls.enabled (not .Values.picker.tls.secretName) -}}
{{- fail "picker.tls.enabled needs picker.tls.secretName (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- if and .Values.picker.endpointSelector (not .Values.picker.endpointTargetPorts) -}}
{{- fail "picker.endpointSelector needs picker.endpointTargetPorts (the serving ports of the selected pods)" -}}
{{- end -}}
{{- if and .Values.inferencePool.enabled .Values.picker.endpointSelector -}}
{{- fail "picker.endpointSelector is for a picker without inferencePool (the pool has its own selector)" -}}
{{- end -}}
{{- if and (or .Values.inferencePool.enabled .Values.picker.endpointSelector) .Values.picker.endpoints -}}
{{- fail "picker.endpoints is for a static list: not with inferencePool.enabled or picker.endpointSelector" -}}
{{- end -}}
{{- if and .Values.inferencePool.enabled (not .Values.picker.enabled) -}}
{{- fail "inferencePool.enabled needs picker.enabled (the pool's endpoint picker)" -}}
{{- end -}}
{{- end -}}

{{/* The InferencePool's name (also the picker's --pool-name). */}}
{{- define "kvindex.poolName" -}}
{{- default (include "kvindex.fullname" .) .Values.inferencePool.name -}}
{{- end -}}

{{/* "true" when the picker watches Kubernetes (a pool or a selector) and needs its token and Role. */}}
{{- define "kvindex.pickerWatches" -}}
{{- if and .Values.picker.enabled (or .Values.inferencePool.enabled .Values.picker.endpointSelector) -}}true{{- end -}}
{{- end -}}
