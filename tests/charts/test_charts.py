"""The Helm charts, rendered and linted by Helm's own SDK, every manifest validated against the
Kubernetes schemas of a pinned version and the CRDs' own schemas, and what they deploy checked
against the services it runs (their --check-config on the rendered arguments)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmd.autoscaler.variants import parse_variants
from llmd.dev.charts import (
    COMPONENTS,
    REQUIRED_VALUES,
    UMBRELLA,
    ChartError,
    Validator,
    charts_dir,
    check_all,
    lint,
    path_values,
    render,
    validate_all,
)
from llmd.dev.envoy import EnvoySettings, envoy_config
from llmd.scheduler.config import DEFAULT_CONFIG

CHARTS = charts_dir()
PATHS = dict(path_values())
BIN = Path(sys.executable).parent


def umbrella(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return render(CHARTS / UMBRELLA, values)


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, [d["metadata"]["name"] for d in of_kind(docs, kind)]
    return found[0]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for d in of_kind(docs, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"]:
            yield f"{d['metadata']['name']}/{c['name']}", c, spec


def test_the_paths_are_the_documented_ones() -> None:
    assert set(PATHS) == {
        "inference-scheduling",
        "precise-prefix-cache",
        "workload-autoscaling",
        "simulated",
        "pd-disaggregation",
        "tiered-prefix-cache",
        "wide-ep",
    }
    for name in PATHS:
        assert (CHARTS / "paths" / name / "README.md").is_file(), name


@pytest.mark.parametrize("chart", [*COMPONENTS, UMBRELLA])
def test_each_chart_lints_clean_and_every_manifest_validates(chart: str) -> None:
    values = REQUIRED_VALUES.get(chart, {})
    assert lint(CHARTS / chart, values) == []
    docs = render(CHARTS / chart, values)
    assert of_kind(docs, "Deployment"), chart
    validate_all(docs)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_each_well_lit_path_lints_and_validates(path: str) -> None:
    assert lint(CHARTS / UMBRELLA, PATHS[path]) == []
    validate_all(umbrella(PATHS[path]))


def test_the_optional_objects_validate_too() -> None:
    """ServiceMonitors, the InferencePool and VariantAutoscalings, each against its schema."""
    monitor = {"serviceMonitor": {"enabled": True}}
    values = copy.deepcopy(PATHS["workload-autoscaling"])
    for name in ("scheduler", "modelServer", "autoscaler", "activator"):
        values.setdefault(name, {}).update(monitor)
    values["scheduler"]["inferencePool"] = {"enabled": True, "failureMode": "FailOpen"}
    values["indexer"] = {"enabled": True, **monitor}
    docs = umbrella(values)
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "InferencePool", "VariantAutoscaling"} <= kinds, kinds
    assert len(of_kind(docs, "ServiceMonitor")) == 5
    validate_all(docs)
    pool = of_kind(docs, "InferencePool")[0]["spec"]
    assert pool["endpointPickerRef"] == {
        "group": "",
        "kind": "Service",
        "name": "demo-scheduler",
        "port": {"number": 9002},
        "failureMode": "FailOpen",
    }
    assert pool["selector"]["matchLabels"] == {"llmd.ai/pool": "demo"}


def test_a_bad_manifest_is_reported_with_the_path_of_the_field() -> None:
    docs = umbrella(PATHS["workload-autoscaling"])
    validator = Validator()
    validate_all(docs, validator)
    dep = copy.deepcopy(named(docs, "Deployment", "-scheduler"))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(ChartError, match=r"spec\.template\.spec\.containers\.0.*imagePullPolcy"):
        validator.validate(dep)
    va = copy.deepcopy(of_kind(docs, "VariantAutoscaling")[0])
    va["spec"]["minReplicas"] = -1
    with pytest.raises(ChartError, match=r"VariantAutoscaling/.*spec\.minReplicas: -1"):
        validator.validate(va)


@pytest.mark.parametrize(
    ("values", "where", "message"),
    [
        ({"scheduler": {"gateway": {"enabld": True}}}, "/gateway", "'enabld' not allowed"),
        ({"scheduler": {"config": {"preset": "fast"}}}, "/config/preset", "must be one of"),
        ({"sim": {"blockSize": "big"}}, "/blockSize", "got string"),
        ({"global": {"enginePort": 70000}}, "/global/enginePort", "maximum"),
        ({"autoscaler": {"enabled": True, "actuation": "hpa"}}, "/actuation", "must be one of"),
        (
            {"autoscaler": {"enabled": True, "variants": [{"name": "Bad_Name", "modelID": "m"}]}},
            "/variants/0/name",
            "does not match pattern",
        ),
    ],
)
def test_a_wrong_value_fails_with_the_path_of_the_bad_field(
    values: dict[str, Any], where: str, message: str
) -> None:
    with pytest.raises(ChartError) as exc:
        umbrella(values)
    text = str(exc.value)
    assert f"at '{where}'" in text, text
    assert message in text, text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"global": {"blockSize": 64}, "indexer": {"enabled": True, "blockSize": 32}},
            'indexer.blockSize is "32" but sim.blockSize is "64"',
        ),
        (
            {"scheduler": {"config": {"preset": "precise-prefix-cache", "hashSeed": "7"}}},
            'scheduler.config.hashSeed is "7" but sim.hashSeed is ""',
        ),
        (
            {"sim": {"poolName": "other"}},
            'scheduler.pool.name is "demo" but sim.poolName is "other"',
        ),
        (
            {"sim": {"enginePort": 9000}},
            'scheduler.pool.targetPort is "8000" but sim.enginePort is "9000"',
        ),
        (
            {
                "scheduler": {"config": {"preset": "precise-prefix-cache"}},
                "sim": {"kvEvents": {"enabled": False}},
            },
            "sim.kvEvents.enabled is false",
        ),
        (
            {"activator": {"enabled": True, "deployment": "x"}},
            "scheduler.activatorEndpoint is empty",
        ),
        ({"sim": {"enabled": False}}, "the scheduler has no engines to route to"),
        ({"modelServer": {"enabled": True}}, "modelServer and sim all create the pool's engine"),
        (
            {"scheduler": {"config": {"preset": "pd"}}},
            "the engines lack a decode role and a prefill role",
        ),
        (
            {"scheduler": {"config": {"preset": "cache-source"}}},
            "no engine has the both role",
        ),
    ],
)
def test_components_that_disagree_fail_the_render_naming_both_keys(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ChartError, match="llmd: ") as exc:
        umbrella(values)
    assert message in str(exc.value), str(exc.value)


def test_shared_values_set_once_reach_every_component() -> None:
    docs = umbrella(
        {
            "global": {"blockSize": 64, "hashSeed": "42", "poolName": "chat", "enginePort": 8200},
            "scheduler": {"config": {"preset": "precise-prefix-cache"}},
            "indexer": {"enabled": True},
        }
    )
    sched = named(docs, "Deployment", "-scheduler")["spec"]["template"]["spec"]["containers"][0]
    assert "--endpoint-selector=llmd.ai/pool=chat" in sched["args"]
    assert "--endpoint-target-port=8200" in sched["args"]
    config = yaml.safe_load(named(docs, "ConfigMap", "-scheduler")["data"]["config.yaml"])
    params = config["plugins"][0]["parameters"]
    assert params["tokenProcessorConfig"] == {"blockSizeTokens": 64, "hashSeed": "42"}
    assert params["tokenizer"] == {"renderUrl": "http://demo-engines:8200"}
    sim = named(docs, "Deployment", "-sim")
    args = sim["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"--block-size=64", "--hash-seed=42", "--port=8200"} <= set(args)
    assert sim["spec"]["template"]["metadata"]["labels"]["llmd.ai/pool"] == "chat"
    idx = named(docs, "Deployment", "-indexer")["spec"]["template"]["spec"]["containers"][0]
    assert {"--block-size=64", "--hash-seed=42", "--endpoint-selector=llmd.ai/pool=chat"} <= set(
        idx["args"]
    )
    engines = named(docs, "Service", "-engines")
    assert engines["spec"]["selector"] == {"llmd.ai/pool": "chat"}


def test_the_vllm_model_server_gets_the_shared_values_as_vllm_flags() -> None:
    docs = umbrella(PATHS["precise-prefix-cache"])
    c = named(docs, "Deployment", "-model-server")["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert {"--block-size=64", "--served-model-name=Qwen/Qwen3-0.6B", "--port=8000"} <= set(
        c["args"]
    )
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PYTHONHASHSEED"] == "42"
    events = next(a for a in c["args"] if a.startswith("--kv-events-config="))
    doc = json.loads(events.split("=", 1)[1])
    assert doc["topic"] == "kv@$(POD_NAME)@Qwen/Qwen3-0.6B"
    assert doc["endpoint"] == "tcp://*:5557"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_chart_default_scheduler_config_is_the_local_stack_default() -> None:
    """One source of truth: the chart's default preset is the config `llmd-dev up` runs."""
    shipped = (CHARTS / "llmd-scheduler" / "files" / "configs" / "default.yaml").read_text()
    assert shipped == DEFAULT_CONFIG
    docs = umbrella()
    assert named(docs, "ConfigMap", "-scheduler")["data"]["config.yaml"].strip() == (
        DEFAULT_CONFIG.strip()
    )


def test_the_chart_envoy_config_is_the_generated_one() -> None:
    """files/envoy.yaml is `llmd-dev envoy-config --port 8081` (make charts-envoy rewrites it)."""
    text = (CHARTS / "llmd-scheduler" / "files" / "envoy.yaml").read_text()
    assert yaml.safe_load(text) == envoy_config(EnvoySettings(listen_port=8081))
    authz = (CHARTS / "llmd-scheduler" / "files" / "envoy-authz.yaml").read_text()
    assert yaml.safe_load(authz) == envoy_config(
        EnvoySettings(listen_port=8081, scheduler_api="ext_authz", extauthz_port=9004)
    )


def test_the_gateway_can_ask_the_scheduler_through_ext_authz() -> None:
    docs = umbrella({"scheduler": {"gateway": {"schedulerApi": "ext_authz"}}})
    envoy = yaml.safe_load(named(docs, "ConfigMap", "-scheduler")["data"]["envoy.yaml"])
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    names = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    assert "envoy.filters.http.ext_authz" in names
    assert "envoy.filters.http.ext_proc" not in names
    sched = next(c for name, c, _ in containers(docs) if name.endswith("-scheduler/scheduler"))
    assert "--extauthz-port=9004" in sched["args"]
    plain = umbrella()
    sched = next(c for name, c, _ in containers(plain) if name.endswith("-scheduler/scheduler"))
    assert not any(a.startswith("--extauthz-port") for a in sched["args"])


def kubeconfig(tmp_path: Path) -> dict[str, str]:
    """A kubeconfig naming an API server nobody listens on: enough for a service to build its
    clients (what --check-config does) without a cluster."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    return {**env, "KUBECONFIG": str(path)}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_rendered_llmd_service_passes_its_own_check_config(path: str, tmp_path: Path) -> None:
    """The rendered arguments and config files are ones the services accept."""
    values = copy.deepcopy(PATHS[path])
    values.setdefault("indexer", {})["enabled"] = True
    docs = umbrella(values)
    config = named(docs, "ConfigMap", "-scheduler")["data"]["config.yaml"]
    (tmp_path / "config.yaml").write_text(config)
    env = kubeconfig(tmp_path)
    checked = []
    for where, c, _ in containers(docs):
        binary = {
            "scheduler": "llmd-scheduler",
            "indexer": "llmd-indexer",
            "autoscaler": "llmd-autoscaler",
            "activator": "llmd-activator",
        }.get(c["name"])
        if binary is None:
            continue
        args = [
            a.replace("/etc/llmd/scheduler/config.yaml", str(tmp_path / "config.yaml"))
            for a in c["args"]
        ]
        r = subprocess.run(
            [str(BIN / binary), *args, "--check-config"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert r.returncode == 0, f"{where}: {r.stderr[-2000:]}"
        assert "config OK" in r.stdout, r.stdout
        checked.append(c["name"])
    assert "scheduler" in checked
    assert "indexer" in checked


def test_the_gateway_outlasts_a_cold_start_where_the_activator_holds_requests() -> None:
    docs = umbrella(PATHS["workload-autoscaling"])
    envoy = yaml.safe_load(named(docs, "ConfigMap", "-scheduler")["data"]["envoy.yaml"])
    listener = envoy["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["request_timeout"] == "600s"
    activator = named(docs, "Deployment", "-activator")["spec"]["template"]["spec"]
    assert "--hold-timeout=300s" in activator["containers"][0]["args"]  # below the gateway's


def test_the_autoscaler_reads_the_variant_autoscalings_the_chart_creates() -> None:
    docs = umbrella(PATHS["workload-autoscaling"])
    variants = parse_variants(of_kind(docs, "VariantAutoscaling"))
    assert [(v.name, v.target, v.min_replicas, v.max_replicas) for v in variants] == [
        ("qwen3-0-6b-h100", "demo-model-server", 0, 8)
    ]
    engines = named(docs, "Deployment", "-model-server")
    labels = engines["spec"]["template"]["metadata"]["labels"]
    assert labels["llm-d.ai/variant"] == "qwen3-0-6b-h100"  # how the autoscaler finds its pods
    activator = named(docs, "Deployment", "-activator")["spec"]["template"]["spec"]
    assert "--pool=demo-model-server" in activator["containers"][0]["args"]
    sched = named(docs, "Deployment", "-scheduler")["spec"]["template"]["spec"]["containers"][0]
    assert "--activator-endpoint=demo-activator:8090" in sched["args"]


def test_every_container_is_locked_down_probed_and_sized() -> None:
    values = copy.deepcopy(PATHS["workload-autoscaling"])
    values["indexer"] = {"enabled": True}
    values["modelServer"]["service"] = {"enabled": False}
    values["sim"] = {"enabled": True}
    docs = umbrella(values)
    seen = set()
    for where, c, pod in containers(docs):
        seen.add(c["name"])
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        if c["name"] != "vllm":  # vLLM writes its compile caches next to its code
            assert sc["readOnlyRootFilesystem"] is True, where
        assert c["resources"]["requests"], where
        assert "livenessProbe" in c, where
        assert "readinessProbe" in c, where
    assert seen == {"scheduler", "envoy", "vllm", "sim", "indexer", "autoscaler", "activator"}


def test_rbac_is_least_privilege() -> None:
    docs = umbrella({**PATHS["workload-autoscaling"], "indexer": {"enabled": True}})
    roles = of_kind(docs, "Role")
    assert not of_kind(docs, "ClusterRole")  # namespaced unless asked for every namespace
    assert len(roles) == 4
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"], role
            assert "*" not in rule["resources"], role
            assert not {"delete", "create", "deletecollection"} & set(rule["verbs"]), role
    sched = named(docs, "Role", "-scheduler")
    assert sched["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    wide = umbrella(
        {
            **PATHS["workload-autoscaling"],
            "autoscaler": {
                **PATHS["workload-autoscaling"]["autoscaler"],
                "watchAllNamespaces": True,
            },
        }
    )
    assert [r["metadata"]["name"] for r in of_kind(wide, "ClusterRole")] == ["demo-autoscaler"]


def test_inference_objectives_from_the_cluster_get_the_flag_and_the_read_rights() -> None:
    docs = umbrella({"scheduler": {"inferenceObjectives": {"fromCluster": True}}})
    sched = named(docs, "Deployment", "-scheduler")["spec"]["template"]["spec"]["containers"][0]
    assert "--inference-objectives-source=kubernetes" in sched["args"]
    rules = named(docs, "Role", "-scheduler")["rules"]
    assert rules[1] == {
        "apiGroups": ["llm-d.ai", "inference.networking.x-k8s.io"],
        "resources": ["inferenceobjectives"],
        "verbs": ["get", "list", "watch"],
    }


def test_a_decode_pod_runs_the_sidecar_in_front_of_vllm(tmp_path: Path) -> None:
    values = {
        **PATHS["inference-scheduling"],
        "modelServer": {"enabled": True, "pd": {"role": "decode"}},
    }
    docs = umbrella(values)
    validate_all(docs)
    pod = named(docs, "Deployment", "-model-server")["spec"]["template"]
    assert pod["metadata"]["labels"]["llm-d.ai/role"] == "decode"
    vllm, sidecar = pod["spec"]["containers"]
    assert "--port=8200" in vllm["args"]
    assert (
        '--kv-transfer-config={"kv_connector":"NixlConnector","kv_role":"kv_both"}' in vllm["args"]
    )
    env = {e["name"]: e for e in vllm["env"]}
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "status.podIP"}
    }
    assert sidecar["ports"][0] == {"name": "http", "containerPort": 8000}  # the pool's port
    r = subprocess.run(
        [str(BIN / "llmd-sidecar"), *sidecar["args"], "--check-config"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "-> decoder http://127.0.0.1:8200" in r.stdout
    # SSRF protection: the sidecar follows the InferencePool the scheduler chart creates
    values["modelServer"]["pd"]["sidecar"] = {"ssrfProtection": True}
    with pytest.raises(ChartError, match="needs the pool's InferencePool"):
        umbrella(values)
    values["scheduler"] = {**values["scheduler"], "inferencePool": {"enabled": True}}
    docs = umbrella(values)
    validate_all(docs)
    pod = named(docs, "Deployment", "-model-server")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "demo-model-server"
    assert "--inference-pool=llm/demo" in pod["containers"][1]["args"]
    assert of_kind(docs, "InferencePool")[0]["metadata"]["name"] == "demo"
    rules = named(docs, "Role", "-model-server")["rules"]
    assert rules[0]["resources"] == ["inferencepools"]


def test_e_p_d_pods_an_encode_pod_moves_no_kv_and_the_sidecar_runs_the_encoder_stage() -> None:
    values = {
        **PATHS["inference-scheduling"],
        "modelServer": {
            "enabled": True,
            "pd": {"role": "decode", "sidecar": {"ecConnector": "ec-nixl", "encodeTimeout": "20s",
                                                  "tls": {"enableTLS": ["encoder"]}}},
        },
    }  # fmt: skip
    docs = umbrella(values)
    validate_all(docs)
    sidecar = named(docs, "Deployment", "-model-server")["spec"]["template"]["spec"]["containers"][
        1
    ]
    assert "--ec-connector=ec-nixl" in sidecar["args"]
    assert "--encode-timeout=20s" in sidecar["args"]
    r = subprocess.run(
        [str(BIN / "llmd-sidecar"), *sidecar["args"], "--check-config"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "encoder stage ec-nixl" in r.stdout
    values["modelServer"]["pd"] = {"role": "encode"}
    docs = umbrella(values)
    validate_all(docs)
    pod = named(docs, "Deployment", "-model-server")["spec"]["template"]
    assert pod["metadata"]["labels"]["llm-d.ai/role"] == "encode"
    (vllm,) = pod["spec"]["containers"]  # no sidecar
    assert not any(a.startswith("--kv-transfer-config") for a in vllm["args"])
    assert "VLLM_NIXL_SIDE_CHANNEL_HOST" not in {e["name"] for e in vllm["env"]}
    values["modelServer"]["pd"] = {"role": "decode", "sidecar": {"ecConnector": "ec-mooncake"}}
    with pytest.raises(ChartError, match="ecConnector"):
        umbrella(values)


def test_a_cache_source_pool_runs_the_sidecar_on_every_pod_and_its_preset_loads(
    tmp_path: Path,
) -> None:
    values = {
        **PATHS["inference-scheduling"],
        "modelServer": {"enabled": True, "pd": {"role": "both"}},
    }
    values["scheduler"] = {**values["scheduler"], "config": {"preset": "cache-source"}}
    docs = umbrella(values)
    validate_all(docs)
    pod = named(docs, "Deployment", "-model-server")["spec"]["template"]
    assert pod["metadata"]["labels"]["llm-d.ai/role"] == "both"
    vllm, sidecar = pod["spec"]["containers"]
    assert "--port=8200" in vllm["args"]
    assert sidecar["ports"][0] == {"name": "http", "containerPort": 8000}
    config = named(docs, "ConfigMap", "-scheduler")["data"]["config.yaml"]
    assert "llmd-cache-source-pd-decider" in config
    (tmp_path / "config.yaml").write_text(config)
    sched = named(docs, "Deployment", "-scheduler")["spec"]["template"]["spec"]["containers"][0]
    args = [a.replace("/etc/llmd/scheduler/config.yaml", str(tmp_path / "config.yaml"))
            for a in sched["args"]]  # fmt: skip
    r = subprocess.run(
        [str(BIN / "llmd-scheduler"), *args, "--check-config"],
        capture_output=True, text=True, timeout=120, env=kubeconfig(tmp_path), check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "config OK" in r.stdout


def test_the_sidecar_serves_https_from_a_tls_secret_behind_a_tls_gateway() -> None:
    tls = {"secretName": "decode-tls", "enableTLS": ["prefiller"], "insecureSkipVerify": []}
    values = {
        **PATHS["inference-scheduling"],
        "modelServer": {"enabled": True, "pd": {"role": "decode", "sidecar": {"tls": tls}}},
    }
    with pytest.raises(ChartError, match="calls the pods over plain HTTP"):
        umbrella(values)
    values["scheduler"] = {**values["scheduler"], "gateway": {"enabled": False}}
    docs = umbrella(values)
    validate_all(docs)
    pod = named(docs, "Deployment", "-model-server")["spec"]["template"]["spec"]
    sidecar = pod["containers"][1]
    assert {"--secure-proxy", "--cert-path=/etc/llmd/tls", "--enable-tls=prefiller"} <= set(
        sidecar["args"]
    )
    assert sidecar["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert sidecar["volumeMounts"] == [
        {"name": "sidecar-tls", "mountPath": "/etc/llmd/tls", "readOnly": True}
    ]
    assert {"name": "sidecar-tls", "secret": {"secretName": "decode-tls"}} in pod["volumes"]
    # the rendered flags are the sidecar's own (a cert directory must exist to check them)
    r = subprocess.run(
        [str(BIN / "llmd-sidecar"), *sidecar["args"], "--check-config"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    tls["enableTLS"] = ["encode"]
    with pytest.raises(ChartError, match="enableTLS"):
        umbrella(values)


def test_llmd_dev_charts_checks_everything() -> None:
    assert check_all(CHARTS) == []
    r = subprocess.run(
        [str(BIN / "llmd-dev"), "charts"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "charts OK" in r.stdout


def test_the_wide_ep_path_runs_data_and_expert_parallel_pods() -> None:
    docs = umbrella(PATHS["wide-ep"])
    validate_all(docs)
    pod = named(docs, "Deployment", "-model-server")["spec"]["template"]["spec"]
    vllm = pod["containers"][0]
    args = vllm["args"]
    assert "--data-parallel-size=8" in args
    assert "--enable-expert-parallel" in args
    assert not any(a.startswith("--tensor-parallel-size") for a in args)
    assert not any(a.startswith("--kv-events-config") for a in args)
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 8

    def with_model_server(**changes: Any) -> dict[str, Any]:
        values = copy.deepcopy(PATHS["wide-ep"])
        values["modelServer"].update(changes)
        return values

    with pytest.raises(ChartError, match=r"= 16 GPUs per pod, but resources.limits"):
        umbrella(with_model_server(parallelism={"tensor": 2, "data": 8, "expert": True}))
    with pytest.raises(ChartError, match="each data-parallel rank's KV events"):
        umbrella(with_model_server(kvEvents={"enabled": True}))
    with pytest.raises(ChartError, match=r"needs parallelism\.tensor x parallelism\.data > 1"):
        umbrella(
            with_model_server(
                parallelism={"data": 1, "expert": True},
                resources={"limits": {"nvidia.com/gpu": 1}},
            )
        )
    with pytest.raises(ChartError, match="allToAll"):
        umbrella(with_model_server(parallelism={"data": 8, "allToAll": "warp"}))


def test_the_tiered_prefix_cache_path_wires_the_fs_tier_and_its_evictor(tmp_path: Path) -> None:
    from llmd.fs_offload.settings import FsOffloadSettings

    values = copy.deepcopy(PATHS["tiered-prefix-cache"])
    docs = umbrella(values)
    validate_all(docs)
    pod = named(docs, "Deployment", "-model-server")["spec"]["template"]
    assert pod["metadata"]["labels"]["llmd.ai/storage-domain"] == "llmd-kv"
    spec = pod["spec"]
    (init,) = spec["initContainers"]
    assert init["command"] == ["cp", "-r", "/opt/llmd-plugin/llmd", "/plugin/"]
    assert init["image"].startswith("ghcr.io/llmd/llmd-fs-evictor:")
    vllm = spec["containers"][0]
    (arg,) = [a for a in vllm["args"] if a.startswith("--kv-transfer-config=")]
    ktc = json.loads(arg.removeprefix("--kv-transfer-config="))
    assert ktc["kv_connector"] == "LlmdFsConnector"
    assert ktc["kv_connector_module_path"] == "llmd.fs_offload.connector"
    assert ktc["kv_load_failure_policy"] == "recompute"
    extra = ktc["kv_connector_extra_config"]
    assert extra["spec_module_path"] == "llmd.fs_offload.spec"
    assert extra["block_size"] == 256
    settings = FsOffloadSettings.from_extra_config(extra)  # the plugin accepts what the chart sets
    assert settings.root == "/mnt/kv"
    assert settings.storage_domain == "llmd-kv"
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert env["PYTHONPATH"] == "/opt/llmd-plugin"
    mounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
    assert mounts["kv"] == "/mnt/kv"
    assert mounts["llmd-plugin"] == "/opt/llmd-plugin"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["kv"]["persistentVolumeClaim"]["claimName"] == "llmd-kv"

    evictor = named(docs, "Deployment", "-fs-evictor")["spec"]["template"]["spec"]
    (c,) = evictor["containers"]
    assert evictor["volumes"][0]["persistentVolumeClaim"]["claimName"] == "llmd-kv"
    args = [a.replace("--root=/mnt/kv", f"--root={tmp_path}") for a in c["args"]]
    args = [a.replace("$(POD_NAME)", "evictor-0") for a in args]
    r = subprocess.run(
        [str(BIN / "llmd-fs-evictor"), *args, "--check-config"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "between 70% and 85%" in r.stdout
    assert "BlockRemoved on tcp://*:5557" in r.stdout
    ports = {p["name"] for p in named(docs, "Service", "-fs-evictor")["spec"]["ports"]}
    assert ports == {"metrics", "kv-events"}

    values["fsEvictor"]["claimName"] = "other"
    with pytest.raises(ChartError, match="the evictor must keep the volume"):
        umbrella(values)
    values["fsEvictor"]["claimName"] = "llmd-kv"
    # the llmd-model-server image has the plugin: no init container, no PYTHONPATH
    installed = copy.deepcopy(values)
    installed["modelServer"]["image"] = {"repository": "ghcr.io/llmd/llmd-model-server"}
    installed["modelServer"]["fsOffload"]["pluginInstalled"] = True
    docs = umbrella(installed)
    validate_all(docs)
    spec = named(docs, "Deployment", "-model-server")["spec"]["template"]["spec"]
    assert "initContainers" not in spec
    vllm = spec["containers"][0]
    assert "PYTHONPATH" not in {e["name"] for e in vllm["env"]}
    assert {m["name"] for m in vllm["volumeMounts"]} >= {"kv"}
    assert "llmd-plugin" not in {v["name"] for v in spec["volumes"]}
    assert any(a.startswith("--kv-transfer-config=") for a in vllm["args"])
    values["modelServer"]["pd"] = {"role": "decode"}
    with pytest.raises(ChartError, match="choose one"):
        umbrella(values)


def test_warm_start_prompts_reach_the_activator_as_a_mounted_file(tmp_path: Path) -> None:
    values = copy.deepcopy(PATHS["workload-autoscaling"])
    prompts = ["You are a support agent. Policies: ...",
               {"messages": [{"role": "system", "content": "Review code."}], "model": "m2"}]  # fmt: skip
    values["activator"]["warmStart"] = {"prompts": prompts, "model": "m1"}
    docs = umbrella(values)
    validate_all(docs)
    data = named(docs, "ConfigMap", "-activator-warm-prompts")["data"]["warm-prompts.yaml"]
    assert yaml.safe_load(data) == prompts
    spec = named(docs, "Deployment", "-activator")["spec"]["template"]
    assert "llmd.ai/warm-prompts-checksum" in spec["metadata"]["annotations"]
    c = spec["spec"]["containers"][0]
    assert c["volumeMounts"][0]["mountPath"] == "/etc/llmd-activator"
    assert "--warm-model=m1" in c["args"]
    (tmp_path / "warm-prompts.yaml").write_text(data)
    args = [a.replace("/etc/llmd-activator", str(tmp_path)) for a in c["args"]]
    r = subprocess.run([str(BIN / "llmd-activator"), *args, "--check-config"],
                       capture_output=True, text=True, timeout=120, env=kubeconfig(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warms new replicas with 2 prompt(s)" in r.stdout
    (tmp_path / "warm-prompts.yaml").write_text("- {prompt: hi, messages: []}\n")
    r = subprocess.run([str(BIN / "llmd-activator"), *args, "--check-config"],
                       capture_output=True, text=True, timeout=120, env=kubeconfig(tmp_path))  # fmt: skip
    assert r.returncode == 2
    assert "warm_prompts_file[0]: needs exactly one of prompt, messages" in r.stderr
    values["activator"]["warmStart"] = {"prompts": [{"prompt": "x", "temperature": 0}]}
    with pytest.raises(ChartError, match="warmStart"):
        umbrella(values)
    plain = umbrella(PATHS["workload-autoscaling"])
    assert not [d for d in of_kind(plain, "ConfigMap") if "warm" in d["metadata"]["name"]]


def test_the_activator_learns_warm_prompts_from_the_schedulers_debug_port(
    tmp_path: Path,
) -> None:
    values = copy.deepcopy(PATHS["workload-autoscaling"])
    secret = {"name": "llmd-debug", "key": "token"}
    values["scheduler"]["debug"] = {"enabled": True, "tokenSecret": secret}
    values["activator"]["warmStart"] = {
        "learnFrom": "http://{{ .Release.Name }}-scheduler:9091/debug/hot-prompts",
        "tokenSecret": secret,
        "model": "m1",
    }
    docs = umbrella(values)
    validate_all(docs)
    sched = named(docs, "Deployment", "-scheduler")["spec"]["template"]["spec"]["containers"][0]
    assert {"--debug-port=9091", "--debug-host=0.0.0.0", "--hot-prompts=64"} <= set(sched["args"])
    token = {"secretKeyRef": {"name": "llmd-debug", "key": "token"}}
    assert {"name": "LLMD_SCHEDULER_DEBUG_TOKEN", "valueFrom": token} in sched["env"]
    service = named(docs, "Service", "-scheduler")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["debug"] == 9091
    act = named(docs, "Deployment", "-activator")["spec"]["template"]["spec"]["containers"][0]
    url = [a for a in act["args"] if a.startswith("--warm-prompts-url=")]
    name = service["metadata"]["name"]  # the template names the scheduler's Service
    assert url == [f"--warm-prompts-url=http://{name}:9091/debug/hot-prompts"]
    assert "--warm-top=8" in act["args"]
    assert not [a for a in act["args"] if a.startswith("--warm-prompts-file")]
    assert {"name": "LLMD_ACTIVATOR_WARM_PROMPTS_TOKEN", "valueFrom": token} in act["env"]
    r = subprocess.run([str(BIN / "llmd-activator"), *act["args"], "--check-config"],
                       capture_output=True, text=True, timeout=120, env=kubeconfig(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warms new replicas with 0 prompt(s) and up to 8 learned from http://" in r.stdout
    # the debug port shows prompts: the chart refuses to serve it without a token
    values["scheduler"]["debug"] = {"enabled": True}
    with pytest.raises(ChartError, match=r"debug\.tokenSecret\.name"):
        umbrella(values)
    plain = named(umbrella(PATHS["workload-autoscaling"]), "Deployment", "-scheduler")
    assert not [a for a in plain["spec"]["template"]["spec"]["containers"][0]["args"]
                if a.startswith("--debug")]  # fmt: skip


def test_the_autoscaler_reads_prefill_capacity_from_the_scheduler_it_is_given(
    tmp_path: Path,
) -> None:
    values = copy.deepcopy(PATHS["workload-autoscaling"])
    url = "http://{{ .Release.Name }}-scheduler:9090/metrics"
    values["autoscaler"]["latencyModelUrls"] = {"Qwen/Qwen3-0.6B": url}
    docs = umbrella(values)
    args = named(docs, "Deployment", "-autoscaler")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    flag = [a for a in args if a.startswith("--latency-model-urls=")]
    assert flag == ['--latency-model-urls={"Qwen/Qwen3-0.6B":"http://demo-scheduler:9090/metrics"}']
    r = subprocess.run(
        [str(BIN / "llmd-autoscaler"), *args, "--check-config"],
        capture_output=True, text=True, timeout=120, env=kubeconfig(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    values["autoscaler"]["latencyModelUrls"] = {"m": "https://x/metrics"}
    with pytest.raises(ChartError, match="latencyModelUrls"):
        umbrella(values)
