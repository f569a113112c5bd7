{{/* Names: with the release named like the chart, objects get the names k8s/webhook uses. */}}
{{- define "sos.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sos.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 55 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The webhook's Deployment, Service, PDB and certificate share this name (at most 63). */}}
{{- define "sos.webhook" -}}
{{- printf "%s-webhook" (include "sos.fullname" .) }}
{{- end }}

{{- define "sos.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sos.name" . }}-webhook
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sos.labels" -}}
{{ include "sos.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Labels of objects that are not the webhook (the sidecar's ConfigMaps, the PodMonitor). */}}
{{- define "sos.commonLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "sos.image" -}}
{{- $image := .Values.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "sos.injectedImage" -}}
{{- default (include "sos.image" .) .Values.injection.image }}
{{- end }}

{{- define "sos.serviceAccount" -}}
{{- default (include "sos.webhook" .) .Values.serviceAccount.name }}
{{- end }}

{{/* The Secret holding the serving certificate (tls.crt, tls.key). */}}
{{- define "sos.tlsSecret" -}}
{{- $provided := .Values.certificate.provided }}
{{- if and (not .Values.certificate.certManager.enabled) $provided.existingSecret }}
{{- $provided.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "sos.webhook" .) }}
{{- end }}
{{- end }}

{{/* What the API server must reach: the Service's DNS name, which the certificate names. */}}
{{- define "sos.dnsName" -}}
{{- printf "%s.%s.svc" (include "sos.webhook" .) .Release.Namespace }}
{{- end }}

{{/* A certificate the chart stores restarts the pods when it changes (the webhook re-reads
     cert-manager's renewals itself). */}}
{{- define "sos.podAnnotations" -}}
{{- $annotations := deepCopy .Values.webhook.podAnnotations }}
{{- if include "sos.storesCertificate" . }}
{{- $_ := set $annotations "checksum/tls" (include (print .Template.BasePath "/secret.yaml") . | sha256sum) }}
{{- end }}
{{- toYaml $annotations }}
{{- end }}

{{- define "sos.storesCertificate" -}}
{{- $provided := .Values.certificate.provided }}
{{- if and (not .Values.certificate.certManager.enabled) (not $provided.existingSecret) }}true{{ end }}
{{- end }}
