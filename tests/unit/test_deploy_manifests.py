"""deploy/ manifests must agree with the real `tokenmill serve` CLI: flags, port, host, /health,
and a termination grace period longer than the drain timeout."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import yaml

from tokenmill.entrypoints.cli import serve

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CHART = DEPLOY / "helm" / "tokenmill"


def _serve_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="tokenmill")
    sub = parser.add_subparsers(dest="command")
    return parser, serve.add_parser(sub)


SERVE_DEFAULTS = _serve_parser()[0].parse_args(["serve"])


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --- a tiny Helm renderer: just the template constructs this chart uses ----------------------

def _lookup(values: dict, dotted: str):
    node = values
    for key in dotted.split("."):
        node = node[key]  # KeyError: the template references a key values.yaml lacks
    return node


def _render(template: str, values: dict, helpers: str, release: str = "tm") -> str:
    defines = dict(re.findall(r'\{\{-? define "([\w.]+)" -?\}\}(.*?)\{\{-? end -?\}\}', helpers, re.S))

    def include(name: str) -> str:
        body = re.sub(r"\{\{-?\s*\.Release\.Name\s*-?\}\}", release, defines[name]).strip()
        if re.search(r"\{\{", body):  # e.g. fullname's printf pipeline
            return release
        return body

    text = re.sub(r"\s*\{\{-", "{{", template)  # `{{-` trims whitespace before it
    text = re.sub(r"\{\{#.*?#\}\}", "", text)

    def do_range(m: re.Match) -> str:
        items = _lookup(values, m.group(1))
        return "".join(re.sub(r"\{\{ \. \| quote \}\}", json.dumps(str(i)), m.group(2)) for i in items)

    text = re.sub(r"\{\{ range \.Values\.([\w.]+) \}\}(.*?)\{\{ end \}\}", do_range, text, flags=re.S)
    text = re.sub(r"\{\{ if \.Values\.([\w.]+) \}\}(.*?)\{\{ end \}\}",
                  lambda m: m.group(2) if _lookup(values, m.group(1)) else "", text, flags=re.S)
    text = re.sub(r'\{\{ include "([\w.]+)" \. \| nindent (\d+) \}\}',
                  lambda m: "".join("\n" + " " * int(m.group(2)) + line
                                    for line in include(m.group(1)).splitlines()), text)
    text = re.sub(r'\{\{ include "([\w.]+)" \. \}\}', lambda m: include(m.group(1)), text)
    text = re.sub(r"\{\{ \.Values\.([\w.]+) \| quote \}\}",
                  lambda m: json.dumps(str(_lookup(values, m.group(1)))), text)
    text = re.sub(r"\{\{ \.Values\.([\w.]+) \}\}", lambda m: str(_lookup(values, m.group(1))), text)
    assert "{{" not in text, f"unrendered template expression: {text[text.index('{{'):][:80]}"
    return text


def _helm_docs(**overrides) -> list[dict]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values.update(overrides)
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    docs = []
    for tpl in sorted((CHART / "templates").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(_render(tpl.read_text(), values, helpers)) if d]
    return docs


# --- the checks ---------------------------------------------------------------------------------

def _check_serve_pods(docs: list[dict], extra_flags: tuple[str, ...] = ()) -> None:
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    services = [d for d in docs if d["kind"] == "Service"]
    assert deployments and services
    parser, serve_parser = _serve_parser()
    known = set(serve_parser._option_string_actions)
    port = SERVE_DEFAULTS.port
    assert port == 8000
    for dep in deployments:
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        args = [str(a) for a in c["args"]]
        assert args[0] == "serve"
        # exact flag names (argparse would also accept abbreviations) and a clean parse
        for tok in args:
            if tok.startswith("--"):
                assert tok.split("=", 1)[0] in known, f"unknown tokenmill serve flag {tok}"
        ns, unknown = parser.parse_known_args(args)
        assert not unknown, f"flags tokenmill serve rejects: {unknown}"
        assert ns.host == "0.0.0.0", "127.0.0.1 is unreachable from outside the pod"
        assert ns.port == port
        assert ns.model_tag, "model path argument missing"
        assert pod["terminationGracePeriodSeconds"] > ns.drain_timeout
        assert "lifecycle" not in c, "no preStop: the server drains on SIGTERM"
        for flag in extra_flags:
            assert flag in args
        assert [p["containerPort"] for p in c["ports"]] == [port]
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": port}
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert c["resources"]["requests"]
        envs = {e["name"]: e for e in c.get("env", [])}
        if "TOKENMILL_API_KEY" in envs:
            assert "secretKeyRef" in envs["TOKENMILL_API_KEY"]["valueFrom"]
        labels = dep["spec"]["selector"]["matchLabels"]
        assert dep["spec"]["template"]["metadata"]["labels"].items() >= labels.items()
    for svc in services:
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == [port]


def test_kubernetes_manifests_match_server():
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += _load_all(path)
    kust = next(d for d in docs if d.get("kind") == "Kustomization")
    for res in kust["resources"]:
        assert (DEPLOY / "kubernetes" / res).is_file()
    _check_serve_pods([d for d in docs if d.get("kind") != "Kustomization"])
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    assert any(e["name"] == "TOKENMILL_API_KEY" for e in env)


@pytest.mark.parametrize("overrides,extra", [
    ({}, ()),
    ({"apiKeySecret": "tm-key", "extraArgs": ["--max-num-seqs", "128"]}, ("--max-num-seqs",)),
])
def test_helm_chart_matches_server(overrides, extra):
    docs = _helm_docs(**overrides)
    _check_serve_pods(docs, extra)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = dep["spec"]["template"]["spec"]["containers"][0].get("env", [])
    assert bool(env) == bool(overrides.get("apiKeySecret"))


def test_helm_values_defaults():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["port"] == SERVE_DEFAULTS.port
    assert values["drainTimeout"] == SERVE_DEFAULTS.drain_timeout
    assert values["terminationGracePeriodSeconds"] > values["drainTimeout"]
    for key in ("image", "model", "gpus", "apiKeySecret", "extraArgs"):
        assert key in values
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "tokenmill"


def test_rayservice_parses():
    (rs,) = _load_all(DEPLOY / "ray" / "rayservice.yaml")
    assert rs["kind"] == "RayService"
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert serve_cfg["applications"][0]["import_path"] == "tokenmill.entrypoints.ray_serve:app"
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = cluster["workerGroupSpecs"]
    assert any(int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
               for w in workers for c in w["template"]["spec"]["containers"])
