{{- define "vipgate-k8s.labels" -}}
app.kubernetes.io/name: vipgate-k8s
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
