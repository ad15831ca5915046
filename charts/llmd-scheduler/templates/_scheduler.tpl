{{- define "llmd-scheduler.poolName" -}}
{{- .Values.pool.name | default ((.Values.global).poolName) | default .Release.Name -}}
{{- end -}}

{{- define "llmd-scheduler.selector" -}}
{{- $sel := .Values.pool.selector | default (dict "llmd.ai/pool" (include "llmd-scheduler.poolName" .)) -}}
{{- $parts := list -}}
{{- range $k, $v := $sel }}{{ $parts = append $parts (printf "%s=%s" $k $v) }}{{ end -}}
{{- join "," $parts -}}
{{- end -}}

{{- define "llmd-scheduler.targetPort" -}}
{{- .Values.pool.targetPort | default ((.Values.global).enginePort) | default 8000 -}}
{{- end -}}

{{- define "llmd-scheduler.config" -}}
{{- if .Values.config.text -}}
{{- .Values.config.text -}}
{{- else -}}
{{- $file := printf "files/configs/%s.yaml" .Values.config.preset -}}
{{- $raw := .Files.Get $file -}}
{{- if not $raw -}}
{{- fail (printf "llmd-scheduler: config.preset %q is not one of the shipped presets (default, precise-prefix-cache, pd)" .Values.config.preset) -}}
{{- end -}}
{{- $g := .Values.global | default dict -}}
{{- $render := .Values.config.renderUrl | default (printf "http://%s:%v" (include "llmd.engineService" .) (include "llmd-scheduler.targetPort" .)) -}}
{{- $blockSize := .Values.config.blockSize | default $g.blockSize | default 16 -}}
{{- $seed := .Values.config.hashSeed | default $g.hashSeed | default "" -}}
{{- tpl $raw (dict "Template" .Template "renderUrl" $render "blockSize" $blockSize "hashSeed" (toString $seed) "kvEventsPort" .Values.config.kvEventsPort "nonCachedTokens" .Values.config.nonCachedTokens) -}}
{{- end -}}
{{- end -}}
