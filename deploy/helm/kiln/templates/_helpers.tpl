{{/*
Names. Resource names are "<release>-<chart>" unless overridden, cut to 63 characters
(the DNS label limit).
*/}}
{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiln.fullname" -}}
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

{{- define "kiln.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "kiln.labels" -}}
helm.sh/chart: {{ include "kiln.chart" . }}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "kiln.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels for one component ("server" or "worker"): call with (dict "ctx" $ "component" "server"). */}}
{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The image tag: image.tag, or "v" + appVersion (kiln's release tags are vX.Y.Z).
A floating `latest` is refused here so no values file can sneak it in.
*/}}
{{- define "kiln.imageTag" -}}
{{- $tag := .Values.image.tag | default (printf "v%s" (.Chart.AppVersion | trimPrefix "v")) }}
{{- if eq $tag "latest" }}
{{- fail "image.tag must be a pinned version such as v0.1.0, not latest" }}
{{- end }}
{{- $tag }}
{{- end }}

{{/* The full image reference: repository:tag, plus @digest when image.digest is set. */}}
{{- define "kiln.image" -}}
{{- $repository := required "image.repository is required: the repository holding kiln's image (see deploy/README.md)" .Values.image.repository }}
{{- $tag := include "kiln.imageTag" . }}
{{- with .Values.image.digest }}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" .) }}
{{- fail (printf "image.digest must look like sha256:<64 hex digits>, got %q" .) }}
{{- end }}
{{- printf "%s:%s@%s" $repository $tag . }}
{{- else }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
{{- end }}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the worker join token. */}}
{{- define "kiln.joinTokenSecretName" -}}
{{- default (printf "%s-join-token" (include "kiln.fullname" .)) .Values.joinToken.existingSecret }}
{{- end }}

{{/* The gRPC address workers dial. */}}
{{- define "kiln.coordinatorAddress" -}}
{{- $scheme := ternary "grpcs" "grpc" (not (empty .Values.tls.existingSecret)) }}
{{- default (printf "%s://%s-grpc.%s.svc:%d" $scheme (include "kiln.fullname" .) .Release.Namespace (int .Values.server.service.grpc.port)) .Values.worker.coordinator }}
{{- end }}

{{/* The server's TOML: `server.config`, the farm's lease term in HA mode, then the auth
tokens and anonymous scopes. */}}
{{- define "kiln.serverConfig" -}}
{{- with .Values.server.config }}
{{ . }}
{{- end }}
{{- if .Values.server.ha.enabled }}
[coordinator.farm]
lease_term_secs = {{ .Values.server.ha.leaseTermSecs }}
{{- if .Values.tls.existingSecret }}
# Replicas forward to the leader over TLS: its certificate (the Secret's, shared by every
# replica) names the gRPC Service, and chains to the Secret's CA.
ca_file = "/etc/kiln-tls/ca.crt"
server_name = "{{ include "kiln.fullname" . }}-grpc.{{ .Release.Namespace }}.svc"
{{- end }}
{{- end }}
{{- if .Values.auth.anonymousScopes }}
[coordinator.auth]
anonymous_scopes = {{ toJson .Values.auth.anonymousScopes }}
{{- end }}
{{- range .Values.auth.tokens }}
{{- if not (regexMatch "^[0-9a-f]{64}$" (toString .hash)) }}
{{- fail (printf "auth.tokens: the hash of %q must be a quoted string of 64 hex digits (YAML reads unquoted digits as a number)" .name) }}
{{- end }}
[[coordinator.auth.tokens]]
name = {{ .name | quote }}
hash = {{ .hash | quote }}
scopes = {{ toJson .scopes }}
{{- with .instance }}
instance = {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* KILN_JOIN_TOKEN from the Secret; shared by the server and the workers. */}}
{{- define "kiln.joinTokenEnv" -}}
- name: KILN_JOIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "kiln.joinTokenSecretName" . }}
      key: {{ .Values.joinToken.secretKey }}
{{- end }}

{{/* Pod annotations asking annotation-based Prometheus setups to scrape the metrics port. */}}
{{- define "kiln.scrapeAnnotations" -}}
{{- if .Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: "9090"
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* Only one autoscaler may own the worker Deployment's replica count. */}}
{{- define "kiln.workerAutoscaled" -}}
{{- if and .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}
{{- fail "enable at most one of autoscaling.keda and autoscaling.hpa" }}
{{- end }}
{{- if or .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}true{{ end }}
{{- end }}
