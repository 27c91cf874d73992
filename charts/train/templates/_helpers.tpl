{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "train.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full object name: the release name, plus the chart name unless the release already contains it. */}}
{{- define "train.fullname" -}}
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

{{/*
Job name: pods and per-pod Services are named <job>-worker-<index> (PyTorchJob) or <job>-<index>
(Indexed Job), which must stay within 63 characters, and the Training Operator wants a DNS-1035 name.
*/}}
{{- define "train.jobName" -}}
{{- $name := include "train.fullname" . | trunc 50 | trimSuffix "-" }}
{{- if not (regexMatch "^[a-z]" $name) }}
{{- fail (printf "job name %q must start with a letter (set fullnameOverride)" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "train.configMapName" -}}
{{- printf "%s-config" (include "train.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "train.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "train.selectorLabels" -}}
app.kubernetes.io/name: {{ include "train.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "train.labels" -}}
helm.sh/chart: {{ include "train.chart" . }}
{{ include "train.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/component: train
app.kubernetes.io/part-of: clipjob
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "train.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "train.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Elastic bounds, defaulted to nodes.count and checked: min <= count <= max. */}}
{{- define "train.nodesMin" -}}
{{- if kindIs "invalid" .Values.nodes.min }}{{ .Values.nodes.count }}{{ else }}{{ .Values.nodes.min }}{{ end }}
{{- end }}
{{- define "train.nodesMax" -}}
{{- if kindIs "invalid" .Values.nodes.max }}{{ .Values.nodes.count }}{{ else }}{{ .Values.nodes.max }}{{ end }}
{{- end }}
{{- define "train.checkNodes" -}}
{{- $min := include "train.nodesMin" . | atoi }}
{{- $max := include "train.nodesMax" . | atoi }}
{{- $count := int .Values.nodes.count }}
{{- if or (gt $min $count) (lt $max $count) }}
{{- fail (printf "nodes: need min <= count <= max, got min=%d count=%d max=%d" $min $count $max) }}
{{- end }}
{{- if and (ne .Values.workload "pytorchjob") (or (ne $min $count) (ne $max $count)) }}
{{- fail (printf "nodes: workload %s has a fixed size; set nodes.min and nodes.max to nodes.count (%d) or null" .Values.workload $count) }}
{{- end }}
{{- include "train.checkScheduling" . }}
{{- end }}

{{/*
Values a workload cannot apply fail the render with one line, instead of being dropped: a fixed-size job
gangs all its pods; the Trainer sizes a TrainJob's PodGroup itself; a ClusterTrainingRuntime's own pod
template decides what runtimePatches cannot set; the Trainer rejects TrainJobs that set torchrun's variables.
*/}}
{{- define "train.checkScheduling" -}}
{{- $v := .Values }}
{{- $vol := $v.scheduling.volcano }}
{{- $count := int $v.nodes.count }}
{{- if and $vol.enabled (ne $v.workload "pytorchjob") (not (kindIs "invalid" $vol.minAvailable)) }}
{{- if ne (int $vol.minAvailable) $count }}
{{- fail (printf "scheduling.volcano.minAvailable: workload %s places all nodes.count (%d) pods together; leave it null" $v.workload $count) }}
{{- end }}
{{- end }}
{{- if eq $v.workload "trainJob" }}
{{- if $vol.minResources }}
{{- fail "scheduling.volcano.minResources: the Trainer computes a TrainJob's PodGroup resources; leave it {}" }}
{{- end }}
{{- with $v.trainJob.clusterTrainingRuntime }}
{{- $runtime := . }}
{{- range $key := list "priorityClassName" "affinity" "topologySpreadConstraints" }}
{{- if index $v.scheduling $key }}
{{- fail (printf "scheduling.%s: the pod template of ClusterTrainingRuntime %q decides it; unset it, or leave trainJob.clusterTrainingRuntime empty" $key $runtime) }}
{{- end }}
{{- end }}
{{- if $vol.enabled }}
{{- fail (printf "scheduling.volcano: gang scheduling is the podGroupPolicy of ClusterTrainingRuntime %q; disable it here, or leave trainJob.clusterTrainingRuntime empty" $runtime) }}
{{- end }}
{{- end }}
{{- range $v.env }}
{{- if has .name (list "PET_NNODES" "PET_NPROC_PER_NODE" "PET_NODE_RANK" "PET_MASTER_ADDR" "PET_MASTER_PORT") }}
{{- fail (printf "env: %s is set by the Kubeflow Trainer on TrainJob pods (reserved); remove it" .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Processes per pod: one per GPU unless set. */}}
{{- define "train.nprocPerNode" -}}
{{- if .Values.nprocPerNode }}{{ .Values.nprocPerNode }}
{{- else if gt (int .Values.gpu.perNode) 0 }}{{ int .Values.gpu.perNode }}
{{- else }}1{{ end }}
{{- end }}

{{/*
The elastic agent's shutdown window (`clipjob train --shutdown-timeout`): after the kubelet's SIGTERM the
agent gives the workers this long to commit their step, then SIGKILLs them (torchrun's own default is 30 s,
whatever the grace period). Derived from the one setting, terminationGracePeriodSeconds, less 15 s in which
the agent reads the run dir (10 s at most) to report what is committed, and exits before the kubelet's SIGKILL.
*/}}
{{- define "train.shutdownTimeout" -}}
{{- sub (int .Values.terminationGracePeriodSeconds) 15 }}
{{- end }}

{{- define "train.rdzvId" -}}
{{- default (include "train.jobName" .) .Values.elastic.rdzvId }}
{{- end }}

{{/* Labels of the job object: common labels, the Kueue queue, user labels. */}}
{{- define "train.jobLabels" -}}
{{ include "train.labels" . }}
{{- with .Values.scheduling.kueueQueue }}
kueue.x-k8s.io/queue-name: {{ . | quote }}
{{- end }}
{{- with .Values.jobLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
`clipjob train` arguments common to both workloads: config, preset, run directory, overrides, the
processes per pod (the Training Operator exports PET_NPROC_PER_NODE only for jobs with a Master, so the
flag is always passed) and the agent's shutdown window.
*/}}
{{- define "train.trainArgs" -}}
- train
- --config
- /etc/clipjob/config.yaml
{{- with .Values.preset }}
- --preset
- {{ . | quote }}
{{- end }}
- --run-dir
- {{ .Values.runDir | quote }}
- --nproc-per-node
- {{ include "train.nprocPerNode" . | quote }}
- --shutdown-timeout
- {{ include "train.shutdownTimeout" . | quote }}
{{- range .Values.overrides }}
- --set
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* S3 settings from the existing Secret (never inlined); endpoint and region may be plain values. */}}
{{- define "train.s3Env" -}}
{{- $s3 := .Values.s3 }}
{{- with $s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $s3.secretKeys.accessKeyId | quote }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $s3.secretKeys.secretAccessKey | quote }}}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $s3.secretKeys.sessionToken | quote }}, optional: true}
{{- end }}
{{- if $s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ $s3.region | quote }}
{{- else if $s3.existingSecret }}
- name: AWS_DEFAULT_REGION
  valueFrom:
    secretKeyRef: {name: {{ $s3.existingSecret | quote }}, key: {{ $s3.secretKeys.region | quote }}, optional: true}
{{- end }}
{{- if $s3.endpoint }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ $s3.endpoint | quote }}
{{- else if $s3.existingSecret }}
- name: AWS_ENDPOINT_URL_S3
  valueFrom:
    secretKeyRef: {name: {{ $s3.existingSecret | quote }}, key: {{ $s3.secretKeys.endpoint | quote }}, optional: true}
{{- end }}
{{- end }}

{{/* Container resources with the GPUs added as request and limit. */}}
{{- define "train.resources" -}}
{{- $res := deepCopy (default dict .Values.resources) }}
{{- $gpus := int .Values.gpu.perNode }}
{{- if gt $gpus 0 }}
{{- $limits := default dict $res.limits }}
{{- $requests := default dict $res.requests }}
{{- $_ := set $limits .Values.gpu.resourceName (toString $gpus) }}
{{- $_ := set $requests .Values.gpu.resourceName (toString $gpus) }}
{{- $_ := set $res "limits" $limits }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* The training container's environment: HOME, the S3 settings, a workload's own, the user's. Call with
(dict "root" $ "env" <list of extra env>). */}}
{{- define "train.env" -}}
- name: HOME
  value: /tmp
{{ include "train.s3Env" .root | trim }}
{{- with .env }}
{{ toYaml . }}
{{- end }}
{{- with .root.Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Whether the Volcano PodGroup of this job is the chart's (indexedJob): then its pods name it. */}}
{{- define "train.volcanoGroup" -}}
{{- if and .Values.scheduling.volcano.enabled (eq .Values.workload "indexedJob") }}{{ include "train.jobName" . }}{{ end }}
{{- end }}

{{/*
Pod template shared by the PyTorchJob, the TrainingRuntime and the Indexed Job. Call with
(dict "root" $ "container" <name, default pytorch> "args" <list of extra container args> "env" <list of extra
env> "podSpec" <dict of extra pod spec fields> "noPort" <true: no rendezvous port, the controller adds its own>).
*/}}
{{- define "train.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
metadata:
  labels:
    {{- include "train.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: train
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with include "train.volcanoGroup" $root }}
    scheduling.k8s.io/group-name: {{ . }}
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with .podSpec }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  serviceAccountName: {{ include "train.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  {{- with $v.scheduling.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  {{- if $v.scheduling.volcano.enabled }}
  schedulerName: volcano
  {{- end }}
  {{- with $v.scheduling.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.scheduling.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.scheduling.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.scheduling.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container | default "pytorch" }}
      image: {{ include "train.image" $root | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        {{- include "train.trainArgs" $root | nindent 8 }}
        {{- with .args }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if not .noPort }}
      ports:
        - name: pytorchjob-port
          containerPort: {{ $v.elastic.rdzvPort }}
          protocol: TCP
      {{- end }}
      env:
        {{- include "train.env" (dict "root" $root "env" .env) | nindent 8 }}
      {{- with $v.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- include "train.resources" $root | nindent 8 }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- include "train.volumeMounts" $root | nindent 8 }}
  volumes:
    {{- include "train.volumes" $root | nindent 4 }}
{{- end }}

{{- define "train.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The training container's mounts: the config, a writable /tmp, /dev/shm, the user's. */}}
{{- define "train.volumeMounts" -}}
- name: config
  mountPath: /etc/clipjob
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.shm.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "train.volumes" -}}
- name: config
  configMap:
    name: {{ include "train.configMapName" . }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- if .Values.shm.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
