from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmd.autoscaler.cli import main

VA = {
    "apiVersion": "llmd.ai/v1alpha1",
    "kind": "VariantAutoscaling",
    "metadata": {"name": "a", "namespace": "llm"},
    "spec": {"modelID": "m", "minReplicas": 0, "maxReplicas": 2},
}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "variants_file: required"),
        (["--variants-file", "missing.yaml"], "cannot read missing.yaml"),
        (["--demand-urls", '["https://x/metrics"]'], "metrics URLs are plain http://"),
        (["--latency-model-urls", '{"m": "ftp://x"}'], "latency_model_urls.m"),
        (["--saturation-prefill-target", "0"], "saturation.prefill_target"),
        (["--variants-source", "kubernetes"], "kubernetes needs cluster: kubernetes"),
        (["--saturation-kv-cache-threshold", "1.5"], "saturation.kv_cache_threshold"),
        (["--interval", "soon"], "interval"),
    ],
)
def test_bad_settings_exit_2_naming_them(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    if "--variants-file" not in args and args[:1] != []:
        (tmp_path / "v.yaml").write_text(yaml.safe_dump(VA))
        args = ["--variants-file", "v.yaml", *args]
    assert main(["--check-config", *args]) == 2
    assert message in capsys.readouterr().err


def test_check_config_describes_the_variants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump(VA))
    # camelCase WVA keys in a config file
    cfg = tmp_path / "autoscaler.yaml"
    cfg.write_text(yaml.safe_dump({"variants_file": str(f),
                                   "saturation": {"kvCacheThreshold": 0.9, "queueSpareTrigger": 2}}))  # fmt: skip
    assert main(["--config", str(cfg), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert "1 variant(s), cluster local, actuation scale, every 5s" in out
    assert "llm/a: model m, pool a, cost 10, replicas [0, 2]" in out
    assert main(["--config", str(cfg), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["saturation"]["kv_cache_threshold"] == 0.9
    assert printed["saturation"]["queue_spare_trigger"] == 2
