{{- define "tokenmill.fullname" -}}
{{- printf "%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tokenmill.selectorLabels" -}}
app.kubernetes.io/name: tokenmill
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
