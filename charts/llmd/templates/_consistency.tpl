{{/*
Cross-chart consistency. Each component may override a shared value; the ones deployed together
must then still agree, or the render fails naming both keys. llm-d users report charts whose
values disagree silently (a scheduler hashing 16-token blocks for engines with 64-token blocks
gets no prefix hits and says nothing); here that is a render error.
*/}}

{{/* (list value global-value fallback): the first of them that is set, as a string */}}
{{- define "llmd.effective" -}}
{{- $v := index . 0 -}}
{{- if or (kindIs "invalid" $v) (eq (toString $v) "") }}{{ $v = index . 1 }}{{ end -}}
{{- if or (kindIs "invalid" $v) (eq (toString $v) "") }}{{ $v = index . 2 }}{{ end -}}
{{- toString $v -}}
{{- end -}}

{{/* (list key {where: value}): fail naming the first two places that disagree */}}
{{- define "llmd.agree" -}}
{{- $key := index . 0 -}}{{- $by := index . 1 -}}
{{- $first := "" -}}{{- $firstVal := "" -}}
{{- range $where := keys $by | sortAlpha -}}
{{- $val := index $by $where -}}
{{- if eq $first "" -}}{{- $first = $where -}}{{- $firstVal = $val -}}
{{- else if ne $val $firstVal -}}
{{- fail (printf "llmd: %s is %q but %s is %q: the components deployed together must agree on %s (set global.%s once, or make the overrides equal)" $first $firstVal $where $val $key $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llmd.checkConsistency" -}}
{{- $g := .Values.global | default dict -}}
{{- $v := .Values -}}
{{- $engines := list -}}
{{- if $v.modelServer.enabled }}{{ $engines = append $engines "modelServer" }}{{ end -}}
{{- if $v.prefillServer.enabled }}{{ $engines = append $engines "prefillServer" }}{{ end -}}
{{- if $v.sim.enabled }}{{ $engines = append $engines "sim" }}{{ end -}}
{{- if and $v.scheduler.enabled (not $engines) (not $v.activator.enabled) -}}
{{- fail "llmd: the scheduler has no engines to route to: enable modelServer (vLLM) or sim (simulated engines), or the activator to scale a pool from zero" -}}
{{- end -}}
{{- $precise := and $v.scheduler.enabled (eq (toString $v.scheduler.config.preset) "precise-prefix-cache") -}}
{{- $defaults := dict "blockSize" "16" "hashSeed" "" "poolName" .Release.Name "enginePort" "8000" -}}
{{- range $key := list "blockSize" "hashSeed" "poolName" "enginePort" -}}
{{- $fallback := index $defaults $key -}}
{{- $by := dict -}}
{{- range $name := $engines -}}
{{- $_ := set $by (printf "%s.%s" $name $key) (include "llmd.effective" (list (index (index $v $name) $key) (index $g $key) $fallback)) -}}
{{- end -}}
{{- if and $v.indexer.enabled (ne $key "enginePort") -}}
{{- $_ := set $by (printf "indexer.%s" $key) (include "llmd.effective" (list (index $v.indexer $key) (index $g $key) $fallback)) -}}
{{- end -}}
{{- if and $v.activator.enabled (has $key (list "poolName" "enginePort")) -}}
{{- $_ := set $by (printf "activator.%s" $key) (include "llmd.effective" (list (index $v.activator $key) (index $g $key) $fallback)) -}}
{{- end -}}
{{- if $v.scheduler.enabled -}}
{{- if eq $key "poolName" }}{{ $_ := set $by "scheduler.pool.name" (include "llmd.effective" (list $v.scheduler.pool.name (index $g $key) $fallback)) }}{{ end -}}
{{- if eq $key "enginePort" }}{{ $_ := set $by "scheduler.pool.targetPort" (include "llmd.effective" (list $v.scheduler.pool.targetPort (index $g $key) $fallback)) }}{{ end -}}
{{- if and $precise (has $key (list "blockSize" "hashSeed")) -}}
{{- $_ := set $by (printf "scheduler.config.%s" $key) (include "llmd.effective" (list (index $v.scheduler.config $key) (index $g $key) $fallback)) -}}
{{- end -}}
{{- end -}}
{{- include "llmd.agree" (list $key $by) -}}
{{- end -}}
{{- if $precise -}}
{{- range $name := $engines -}}
{{- if not (index $v $name).kvEvents.enabled -}}
{{- fail (printf "llmd: scheduler.config.preset is precise-prefix-cache but %s.kvEvents.enabled is false: precise routing needs the engines' KV events" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $v.activator.enabled $v.scheduler.enabled (not $v.scheduler.activatorEndpoint) -}}
{{- fail "llmd: activator.enabled is true but scheduler.activatorEndpoint is empty, so the scheduler would never send requests to the activator (set it to \"{{ .Release.Name }}-activator:8090\")" -}}
{{- end -}}
{{- $services := list -}}
{{- range $name := $engines }}{{ if (index $v $name).service.enabled }}{{ $services = append $services $name }}{{ end }}{{ end -}}
{{- if gt (len $services) 1 -}}
{{- fail (printf "llmd: %s all create the pool's engine Service: set service.enabled to false on all but one" (join " and " $services)) -}}
{{- end -}}
{{- if and $v.modelServer.enabled (($v.modelServer.pd).sidecar).ssrfProtection (not ($v.scheduler.enabled) | or (not $v.scheduler.inferencePool.enabled)) -}}
{{- fail "llmd: modelServer.pd.sidecar.ssrfProtection needs the pool's InferencePool: set scheduler.inferencePool.enabled" -}}
{{- end -}}
{{- if and $v.modelServer.enabled ((($v.modelServer.pd).sidecar).tls).secretName $v.scheduler.enabled $v.scheduler.gateway.enabled -}}
{{- fail "llmd: modelServer.pd.sidecar.tls.secretName makes the decode pods serve HTTPS, but the scheduler chart's Envoy (scheduler.gateway.enabled) calls the pods over plain HTTP: put the pods behind a gateway that originates TLS (set scheduler.gateway.enabled=false) or leave secretName empty" -}}
{{- end -}}
{{- $fsServers := list -}}
{{- range $name := list "modelServer" "prefillServer" }}{{ if and (index $v $name).enabled ((index $v $name).fsOffload).enabled }}{{ $fsServers = append $fsServers $name }}{{ end }}{{ end -}}
{{- if $v.fsEvictor.enabled -}}
{{- if not $fsServers -}}
{{- fail "llmd: fsEvictor.enabled is true but no model server has fsOffload.enabled: there is no shared KV volume to keep" -}}
{{- end -}}
{{- range $name := $fsServers -}}
{{- $claim := toString ((index $v $name).fsOffload.claimName) -}}
{{- if ne (toString $v.fsEvictor.claimName) $claim -}}
{{- fail (printf "llmd: fsEvictor.claimName is %q but %s.fsOffload.claimName is %q: the evictor must keep the volume the model servers write" (toString $v.fsEvictor.claimName) $name $claim) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $v.scheduler.enabled (eq (toString $v.scheduler.config.preset) "pd") -}}
{{- $roles := list -}}
{{- range $name := $engines }}{{ $roles = append $roles (toString ((index $v $name).pd | default dict).role) }}{{ end -}}
{{- if not (and (has "decode" $roles) (has "prefill" $roles)) -}}
{{- fail "llmd: scheduler.config.preset is pd but the engines lack a decode role and a prefill role (set modelServer.pd.role=decode and prefillServer.pd.role=prefill)" -}}
{{- end -}}
{{- end -}}
{{- if and $v.scheduler.enabled (eq (toString $v.scheduler.config.preset) "cache-source") -}}
{{- $roles := list -}}
{{- range $name := $engines }}{{ $roles = append $roles (toString ((index $v $name).pd | default dict).role) }}{{ end -}}
{{- if not (has "both" $roles) -}}
{{- fail "llmd: scheduler.config.preset is cache-source but no engine has the both role (set modelServer.pd.role=both)" -}}
{{- end -}}
{{- end -}}
{{- end -}}
