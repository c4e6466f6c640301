"""Every file in deploy/ is validated: compose against the compose-spec JSON schema, Kubernetes
manifests against the Kubernetes (and KEDA CRD) schemas, Prometheus rules as PromQL, RabbitMQ
config keys against the broker's own config schema, definitions against the code's topology;
and every BILLING_* variable the code reads is set in the deploy configuration."""

from __future__ import annotations

import glob
import json
import posixpath
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

from billing import broker
from billing.errors import ConfigError
from billing.settings import PLACEHOLDER, SECRET_VARIABLES, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"

# --- every file is covered ------------------------------------------------------------------
VALIDATED = {
    "README.md": "documentation",
    "Dockerfile": "test_dockerfile_runs_the_cli_with_the_sql_it_needs",
    "compose.yaml": "test_compose_file_matches_the_compose_spec",
    "billing.env.example": "test_every_variable_the_code_reads_is_deployed",
    "postgres.env.example": "test_compose_env_files_have_committed_examples",
    "rabbitmq.env.example": "test_compose_env_files_have_committed_examples",
    "rabbitmq/definitions.json": "test_rabbitmq_definitions_match_the_code_topology",
    "rabbitmq/rabbitmq.conf": "test_rabbitmq_conf_keys_exist_in_the_broker_schema",
    "rabbitmq/enabled_plugins": "test_rabbitmq_enabled_plugins",
    "prometheus/prometheus.yml": "test_prometheus_config_scrapes_the_workers",
    "prometheus/alerts.yml": "test_alert_rules_are_valid_promql",
    "prometheus/kubernetes.yml": "test_the_worker_alerts_select_the_workers_of_both_scrape_configs",
    "k8s/schemas/keda.sh_v1alpha1_scaledobject.json": "test_kubernetes_manifests_match_schemas",
    "k8s/schemas/keda.sh_v1alpha1_triggerauthentication.json": (
        "test_kubernetes_manifests_match_schemas"
    ),
    "k8s/schemas/README.md": "documentation",
    "k8s/kustomization.yaml": "test_kustomization_lists_every_manifest",
    "k8s/rabbitmq-definitions.json": "test_kustomize_reads_definitions_from_inside_its_folder",
}


def deploy_files() -> list[str]:
    return sorted(
        str(p.relative_to(DEPLOY))
        for p in DEPLOY.rglob("*")
        if p.is_file() and not p.name.endswith((".env", ".pyc")) and p.name != "secret.yaml"
    )


def test_every_deploy_file_is_validated() -> None:
    manifests = {f for f in deploy_files() if f.startswith("k8s/") and f.endswith(".yaml")}
    unchecked = set(deploy_files()) - set(VALIDATED) - manifests
    assert not unchecked, f"deploy files no test validates: {sorted(unchecked)}"


# --- compose --------------------------------------------------------------------------------
def check_jsonschema(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    ok = check_jsonschema("--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The validator really checks: a misspelt key is refused.
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        (DEPLOY / "compose.yaml").read_text().replace("stop_grace_period:", "stop_grace:", 1)
    )
    refused = check_jsonschema("--builtin-schema", "vendor.compose-spec", str(broken))
    assert refused.returncode == 1 and "stop_grace" in refused.stdout


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_compose_runs_the_whole_fleet_with_health_checks() -> None:
    services = compose()["services"]
    assert {
        "postgres", "rabbitmq", "migrate", "rabbitmq-definitions", "usage-worker",
        "general-worker", "beat", "webhook", "prometheus",
    } <= set(services)  # fmt: skip
    one_shots = {"migrate", "rabbitmq-definitions"}
    for name, service in services.items():
        if name in one_shots:
            assert service["restart"] == "no"
            continue
        assert "test" in service.get("healthcheck", {}), f"{name} has no health check"
    assert services["beat"]["deploy"]["replicas"] == 1
    # exports run on the general workers (300 s to finish on shutdown), not between batches
    usage_command = services["usage-worker"]["command"]
    assert usage_command == ["worker", "--no-migrate", "-X", "billing.exports"]
    assert "--no-usage" in services["general-worker"]["command"]
    assert "9808/readyz" in " ".join(services["usage-worker"]["healthcheck"]["test"])
    # longer than a batch plus the 60 s the worker waits for the consumer to drain on SIGTERM
    assert int(services["usage-worker"]["stop_grace_period"].rstrip("s")) > 60


def test_compose_env_files_have_committed_examples() -> None:
    env_files = {f for s in compose()["services"].values() for f in s.get("env_file", [])}
    assert env_files == {"billing.env", "postgres.env", "rabbitmq.env"}
    for name in env_files:
        assert (DEPLOY / f"{name}.example").is_file()
    ignored = (ROOT / ".gitignore").read_text()
    assert "deploy/*.env" in ignored and "deploy/k8s/secret.yaml" in ignored


# --- Kubernetes -----------------------------------------------------------------------------
def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(glob.glob(str(K8S / "*.yaml"))):
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if doc is not None and doc.get("kind") != "Kustomization":
                docs.append((Path(path).name, doc))
    return docs


def keda_schema(kind: str) -> dict[str, Any]:
    path = K8S / "schemas" / f"keda.sh_v1alpha1_{kind.lower()}.json"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def validate_manifest(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        jsonschema.validate(doc, keda_schema(doc["kind"]))
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_manifests_match_schemas() -> None:
    docs = manifests()
    assert len(docs) >= 14
    for name, doc in docs:
        try:
            validate_manifest(doc)
        except Exception as exc:
            pytest.fail(f"{name} {doc['kind']}: {exc}")


@pytest.mark.parametrize(
    ("kind", "path", "bad"),
    [
        ("Deployment", ("spec", "template", "spec"), {"terminationGracePeriod": 90}),
        ("Deployment", ("spec",), {"replicas": "two"}),
        ("ScaledObject", ("spec",), {"minReplicas": 2}),
        ("ScaledObject", ("spec",), {"maxReplicaCount": "lots"}),
    ],
)
def test_the_validators_refuse_a_wrong_manifest(
    kind: str, path: tuple[str, ...], bad: dict[str, Any]
) -> None:
    doc = json.loads(json.dumps(next(d for _, d in manifests() if d["kind"] == kind)))
    node = doc
    for key in path:
        node = node[key]
    node.update(bad)
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        validate_manifest(doc)


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == kind}


def test_kubernetes_fleet_shape() -> None:
    deployments = by_kind("Deployment")
    usage = deployments["billing-usage-worker"]["spec"]["template"]["spec"]
    container = usage["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "metrics", "containerPort": 9808} in container["ports"]
    # longer than a batch plus the 60 s the worker waits for the consumer to drain on SIGTERM
    assert usage["terminationGracePeriodSeconds"] > 60
    assert container["args"] == ["worker", "--no-migrate", "-X", "billing.exports"]
    # KEDA owns the count: a replica count here would reset the fleet on every apply
    assert "replicas" not in deployments["billing-usage-worker"]["spec"]
    general = deployments["billing-general-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert general["readinessProbe"]["httpGet"]["path"] == "/readyz"
    beat = deployments["billing-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    assert beat["template"]["spec"]["containers"][0]["args"][0] == "beat"
    scaled = by_kind("ScaledObject")["billing-usage-worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] in deployments
    trigger = scaled["triggers"][0]
    assert (trigger["type"], trigger["metadata"]["queueName"]) == ("rabbitmq", "billing.usage")
    pdb_targets = {
        p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in by_kind("PodDisruptionBudget").values()
    }
    assert pdb_targets == {"usage-worker", "general-worker", "webhook"}
    assert by_kind("Job")["billing-migrate"]["spec"]["template"]["spec"]["containers"][0][
        "args"
    ] == ["migrate"]


def test_every_referenced_config_map_and_secret_exists() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    config_maps = set(by_kind("ConfigMap")) | {
        g["name"] for g in kustomization["configMapGenerator"]
    }
    secrets = set(by_kind("Secret"))
    referenced: list[tuple[str, str]] = []
    pods = [
        d["spec"]["template"]["spec"] for k in ("Deployment", "Job") for d in by_kind(k).values()
    ]
    pods += [
        d["spec"]["jobTemplate"]["spec"]["template"]["spec"] for d in by_kind("CronJob").values()
    ]
    for pod in pods:
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                for ref_kind in ("configMapRef", "secretRef"):
                    if ref_kind in source:
                        referenced.append((ref_kind, source[ref_kind]["name"]))
            for var in container.get("env", []):
                if "secretKeyRef" in var.get("valueFrom", {}):
                    ref = var["valueFrom"]["secretKeyRef"]
                    assert ref["key"] in by_kind("Secret")[ref["name"]]["stringData"]
                    referenced.append(("secretRef", ref["name"]))
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                referenced.append(("configMapRef", volume["configMap"]["name"]))
    assert referenced
    for ref_kind, name in referenced:
        assert name in (config_maps if ref_kind == "configMapRef" else secrets), name
    # the RabbitMQ administrator's credentials reach only the definitions Job
    users = {
        name
        for kind in ("Deployment", "Job", "CronJob")
        for name, doc in by_kind(kind).items()
        if "billing-rabbitmq-admin" in json.dumps(doc)
    }
    assert users == {"billing-rabbitmq-definitions"}


def test_the_definitions_job_creates_the_user_the_billing_processes_log_in_as() -> None:
    """No RabbitMQ on Kubernetes is booted with the billing user (compose's is, rabbitmq.env):
    the Job creates the user of BILLING_BROKER_URL, and reads no other secret of the fleet."""
    job = by_kind("Job")["billing-rabbitmq-definitions"]["spec"]["template"]["spec"]
    container = job["containers"][0]
    assert container["args"][:2] == ["broker", "import-definitions"]
    assert "--create-broker-user" in container["args"]
    assert container["env"] == [
        {
            "name": "BILLING_BROKER_URL",
            "valueFrom": {"secretKeyRef": {"name": "billing-secrets", "key": "BILLING_BROKER_URL"}},
        }
    ]
    assert container["envFrom"] == [{"secretRef": {"name": "billing-rabbitmq-admin"}}]
    # the user it creates is not the administrator it logs in as (that one would be refused)
    secrets = by_kind("Secret")
    user, _, vhost = broker.broker_login(
        secrets["billing-secrets"]["stringData"]["BILLING_BROKER_URL"]
    )
    assert user != secrets["billing-rabbitmq-admin"]["stringData"]["RABBITMQ_DEFAULT_USER"]
    assert vhost in {v["name"] for v in definitions()["vhosts"]}
    # compose: the RabbitMQ container boots with the user of billing.env as its default user
    # (an administrator, which --create-broker-user would refuse)
    services = compose()["services"]
    assert "--create-broker-user" not in services["rabbitmq-definitions"]["command"]
    compose_url = env_example("billing.env.example")["BILLING_BROKER_URL"]
    compose_user, _, compose_vhost = broker.broker_login(compose_url)
    rabbitmq_env = env_example("rabbitmq.env.example")
    assert rabbitmq_env["RABBITMQ_DEFAULT_USER"] == compose_user
    assert rabbitmq_env["RABBITMQ_DEFAULT_VHOST"] == compose_vhost


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == files
    for generator in kustomization["configMapGenerator"]:
        for item in generator["files"]:
            assert (K8S / item.split("=", 1)[1]).is_file()


# --- environment variables -------------------------------------------------------------------
def variables_read_by_code() -> set[str]:
    names: set[str] = set()
    for path in [*(ROOT / "billing").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]:
        names |= set(re.findall(r"\bBILLING_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    return names


def env_example(name: str) -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{name}: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value
    return pairs


def test_every_variable_the_code_reads_is_deployed() -> None:
    read = variables_read_by_code()
    assert {"BILLING_DATABASE_URL", "BILLING_BROKER_URL", "BILLING_USAGE_QUEUE_TYPE"} <= read
    compose_env = set(env_example("billing.env.example"))
    config_map = set(by_kind("ConfigMap")["billing-config"]["data"])
    secret = set(by_kind("Secret")["billing-secrets"]["stringData"])
    assert not read - compose_env, f"missing in billing.env.example: {sorted(read - compose_env)}"
    k8s = config_map | secret
    assert not read - k8s, f"missing in the k8s ConfigMap/Secret: {sorted(read - k8s)}"
    assert not config_map & secret, "a variable is both in the ConfigMap and the Secret"
    # and the deploy files set nothing the code does not read (a typo would be silently ignored)
    for where, names in (("billing.env.example", compose_env), ("k8s", k8s)):
        unknown = {n for n in names if n.startswith("BILLING_")} - read
        assert not unknown, f"{where} sets variables no code reads: {sorted(unknown)}"
    readme = (ROOT / "README.md").read_text()
    undocumented = sorted(n for n in read if f"`{n}`" not in readme)
    assert not undocumented, f"not in the README configuration table: {undocumented}"


def k8s_env() -> dict[str, str]:
    return {
        **by_kind("ConfigMap")["billing-config"]["data"],
        **by_kind("Secret")["billing-secrets"]["stringData"],
    }


def filled_in(env: dict[str, str]) -> dict[str, str]:
    """``env`` with its placeholders replaced, as an operator does before deploying."""
    return {k: v.replace(PLACEHOLDER, "filled-in") for k, v in env.items()}


def test_the_deployed_configuration_is_valid() -> None:
    settings = Settings.from_env(filled_in(env_example("billing.env.example")))
    assert settings.usage_queue_type == "quorum"
    # the same settings apart from the hosts of the two services
    k8s = Settings.from_env(filled_in(k8s_env()))
    assert replace(k8s, database_url="", broker_url="") == replace(
        settings, database_url="", broker_url=""
    )


@pytest.mark.parametrize("example", ["billing.env.example", "k8s billing-secrets"])
def test_the_examples_placeholders_stop_every_process(example: str) -> None:
    """Each secret of the examples holds CHANGE_ME and Settings refuses every one of them: a
    deployment that forgot to fill one in does not start."""
    env = env_example(example) if example.endswith(".example") else k8s_env()
    placeholders = {name for name, value in env.items() if PLACEHOLDER in value}
    assert placeholders == set(SECRET_VARIABLES)
    for name in placeholders:
        with pytest.raises(ConfigError, match=f"{name} still holds"):
            Settings.from_env({**filled_in(env), name: env[name]})


# --- RabbitMQ -------------------------------------------------------------------------------
def definitions() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    return data


def test_rabbitmq_definitions_match_the_code_topology() -> None:
    """A queue declared with other arguments than the broker has is refused (406), so the
    definitions and billing.broker must agree exactly."""
    settings = Settings.from_env(filled_in(env_example("billing.env.example")))
    defs = definitions()
    queues = {q["name"]: q for q in defs["queues"]}
    exchanges = {e["name"]: e for e in defs["exchanges"]}
    for queue in broker.usage_queues(settings):
        assert queues[queue.name]["arguments"] == (queue.queue_arguments or {})
        assert queues[queue.name]["durable"] is True
    dlq = broker.dead_letter_queue(settings)
    assert dlq is not None and queues[dlq.name]["arguments"] == (dlq.queue_arguments or {})
    expected_exchanges = {
        broker.usage_exchange(settings),
        broker.wallet_events_exchange(settings),
        broker.dead_letter_exchange(settings),
    }
    for exchange in expected_exchanges:
        assert exchange is not None
        assert exchanges[exchange.name]["type"] == exchange.type
    for name in (settings.tasks_queue, settings.exports_queue):  # Celery declares them classic
        assert queues[name]["arguments"] == {} and exchanges[name]["type"] == "direct"
    bound = {(b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]}
    assert (settings.usage_exchange, settings.usage_queue, broker.USAGE_ROUTING_KEY) in bound
    vhosts = {v["name"] for v in defs["vhosts"]}
    for item in [*defs["queues"], *defs["exchanges"], *defs["bindings"]]:
        assert item["vhost"] in vhosts
    assert "users" not in defs, "no credentials in a committed file"


def rabbitmq_schema_keys() -> list[re.Pattern[str]]:
    files = glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/**/*.schema", recursive=True)
    if not files:
        pytest.skip("no RabbitMQ installation here to read the config schema from")
    patterns = []
    for path in files:
        for name in re.findall(r'\{mapping,\s*"([^"]+)"', Path(path).read_text()):
            regex = re.escape(name).replace(r"\$", "$")
            patterns.append(re.compile("^" + re.sub(r"\$[a-z_]+", r"[^.]+", regex) + "$"))
    return patterns


def test_rabbitmq_conf_keys_exist_in_the_broker_schema() -> None:
    patterns = rabbitmq_schema_keys()
    keys = []
    for line in (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and value.strip(), f"not key = value: {line!r}"
            keys.append(key.strip())
    assert len(keys) >= 8
    unknown = [k for k in keys if not any(p.match(k) for p in patterns)]
    assert not unknown, f"RabbitMQ would refuse to boot, unknown keys: {unknown}"
    assert not any(p.match("consumer_timout") for p in patterns)  # the check can fail


def test_rabbitmq_enabled_plugins() -> None:
    text = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text().strip()
    assert re.fullmatch(r"\[[a-z_]+(,[a-z_]+)*\]\.", text), "an Erlang list term ending in '.'"
    plugins = set(text[1:-2].split(","))
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= plugins
    installed = glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/*")
    if installed:
        names = {re.sub(r"-[0-9.]+(\.ez)?$", "", Path(p).name) for p in installed}
        assert plugins <= names


# --- Prometheus -----------------------------------------------------------------------------
def test_prometheus_config_scrapes_the_workers() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    services = compose()["services"]
    for job in ("usage-worker", "general-worker"):
        sd = jobs[job]["dns_sd_configs"][0]
        assert sd["names"] == [job] and job in services and sd["port"] == 9808
    mounted = " ".join(services["prometheus"]["volumes"])
    assert "prometheus.yml:/etc/prometheus/prometheus.yml" in mounted
    assert "alerts.yml:/etc/prometheus/alerts.yml" in mounted


WORKERS = ("usage-worker", "general-worker")


def prometheus_config(name: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
    return config


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' target relabelling (the actions these configs use): the target's labels, or
    None if it is dropped."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        raw = rule.get("regex", "(.*)")
        regex = re.compile(str(raw).lower() if isinstance(raw, bool) else str(raw))
        replacement = re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", str(rule.get("replacement", "$1")))
        if action == "labelmap":
            for name, value in list(labels.items()):
                if m := regex.fullmatch(name):
                    labels[m.expand(replacement)] = value
            continue
        source = rule.get("separator", ";").join(
            labels.get(n, "") for n in rule.get("source_labels", [])
        )
        m = regex.fullmatch(source)
        if (action == "keep" and not m) or (action == "drop" and m):
            return None
        if action == "replace" and m:
            labels[rule["target_label"]] = m.expand(replacement)
        assert action in ("keep", "drop", "replace"), f"relabel action {action} not simulated"
    labels.setdefault("instance", labels["__address__"])
    return {k: v for k, v in labels.items() if v and not k.startswith("__")}


def sanitized(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def compose_targets(job: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """(the compose service, its discovered labels) of every target of ``job``."""
    found = []
    for sd in job.get("dns_sd_configs", []):
        for name in sd["names"]:
            address = f"172.18.0.7:{sd['port']}"
            found.append((name, {"__address__": address, "__meta_dns_name": name}))
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            found.append(
                (target.split(":")[0], {"__address__": target, **static.get("labels", {})})
            )
    return found


def kubernetes_targets(job: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """(the pod's component label, its discovered labels) of every target Kubernetes service
    discovery gives ``job`` for the pods of deploy/k8s: one per container port."""
    found = []
    for sd in job.get("kubernetes_sd_configs", []):
        assert sd["role"] == "pod"
        for kind in ("Deployment", "Job"):
            for name, doc in by_kind(kind).items():
                namespace = doc["metadata"]["namespace"]
                if namespace not in sd.get("namespaces", {}).get("names", [namespace]):
                    continue
                meta = doc["spec"]["template"]["metadata"]
                pod = {
                    "__meta_kubernetes_namespace": namespace,
                    "__meta_kubernetes_pod_name": f"{name}-5d8f7c9b6-x2x4q",
                    "__meta_kubernetes_pod_ip": "10.1.2.3",
                }
                for key, value in meta.get("labels", {}).items():
                    pod[f"__meta_kubernetes_pod_label_{sanitized(key)}"] = value
                for key, value in meta.get("annotations", {}).items():
                    pod[f"__meta_kubernetes_pod_annotation_{sanitized(key)}"] = value
                ports = [
                    p["containerPort"]
                    for c in doc["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])
                ]
                addresses = [f"10.1.2.3:{port}" for port in ports] or ["10.1.2.3"]
                component = meta["labels"]["app.kubernetes.io/component"]
                found += [(component, {**pod, "__address__": a}) for a in addresses]
    return found


def scraped_series(config: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """(where from, the labels of its `up` series) of every target a scrape config keeps."""
    series = []
    for job in config["scrape_configs"]:
        for origin, discovered in compose_targets(job) + kubernetes_targets(job):
            labels = relabel({"job": job["job_name"], **discovered}, job.get("relabel_configs", []))
            if labels is not None:
                series.append((origin, labels))
    return series


def selects(matchers: list[promql_parser.Matcher], labels: dict[str, str]) -> bool:
    for m in matchers:
        value = labels.get(m.name, "")
        if m.op == promql_parser.MatchOp.Equal and value != m.value:
            return False
        if m.op == promql_parser.MatchOp.NotEqual and value == m.value:
            return False
        if m.op == promql_parser.MatchOp.Re and not re.fullmatch(m.value, value):
            return False
        if m.op == promql_parser.MatchOp.NotRe and re.fullmatch(m.value, value):
            return False
    return True


def up_selectors() -> dict[str, list[list[promql_parser.Matcher]]]:
    """Every alert's selectors of the ``up`` series (the scrape health of a target)."""
    found: dict[str, list[list[promql_parser.Matcher]]] = {}
    for group in prometheus_config("alerts.yml")["groups"]:
        for rule in group["rules"]:

            def visit(node: promql_parser.Expr, alert: str = rule["alert"]) -> bool:
                if isinstance(node, promql_parser.VectorSelector) and node.name == "up":
                    matchers = [m for m in node.matchers.matchers if m.name != "__name__"]
                    found.setdefault(alert, []).append(matchers)
                return True

            promql_parser.walk(promql_parser.parse(rule["expr"]), visit)
    return found


def test_the_worker_alerts_select_the_workers_of_both_scrape_configs() -> None:
    """The worker-down alerts match the same workers whether Prometheus scrapes the compose
    services (prometheus.yml) or the Kubernetes pods (kubernetes.yml): a selector on a label
    only one of them sets (a job name) would never fire on the other."""
    selectors = up_selectors()
    assert set(selectors) == {"BillingWorkerDown", "BillingNoUsageWorker"}
    compose_series = scraped_series(prometheus_config("prometheus.yml"))
    k8s_series = scraped_series(prometheus_config("kubernetes.yml"))
    # both configs scrape each worker (and only the pods that serve /metrics)
    assert {origin for origin, _ in compose_series} >= set(WORKERS)
    assert {origin for origin, _ in k8s_series} == set(WORKERS) | {"rabbitmq.billing.svc"}
    for alert, matcher_lists in selectors.items():
        for matchers in matcher_lists:
            on_compose = {o for o, labels in compose_series if selects(matchers, labels)}
            on_k8s = {o for o, labels in k8s_series if selects(matchers, labels)}
            assert on_compose, f"{alert} selects no compose worker"
            assert on_compose <= set(WORKERS), f"{alert} selects {on_compose}"
            assert on_k8s == on_compose, f"{alert}: Kubernetes {on_k8s}, compose {on_compose}"
    no_usage_worker = selectors["BillingNoUsageWorker"][0]
    assert {o for o, labels in k8s_series if selects(no_usage_worker, labels)} == {"usage-worker"}
    # the old selector by job name: the check can fail
    by_job = [promql_parser.Matcher(promql_parser.MatchOp.Equal, "job", "usage-worker")]
    assert not any(selects(by_job, labels) for _, labels in k8s_series)
    assert {o for o, labels in compose_series if selects(by_job, labels)} == {"usage-worker"}
    # a relabelled k8s series looks like a scraped pod
    usage = next(labels for o, labels in k8s_series if o == "usage-worker")
    assert usage["instance"] == "10.1.2.3:9808" and usage["namespace"] == "billing"


RULE_SCHEMA = {
    "type": "object",
    "required": ["groups"],
    "additionalProperties": False,
    "properties": {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "rules"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "interval": {"type": "string"},
                    "rules": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["alert", "expr", "annotations", "labels"],
                            "additionalProperties": False,
                            "properties": {
                                "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                "expr": {"type": "string"},
                                "for": {"type": "string", "pattern": "^[0-9]+[smhd]$"},
                                "labels": {
                                    "type": "object",
                                    "required": ["severity"],
                                    "properties": {"severity": {"enum": ["page", "ticket"]}},
                                },
                                "annotations": {
                                    "type": "object",
                                    "required": ["summary", "description"],
                                    "additionalProperties": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        }
    },
}


def test_alert_rules_are_valid_promql() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    jsonschema.validate(rules, RULE_SCHEMA)
    names = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            promql_parser.parse(rule["expr"])
            names.append(rule["alert"])
    assert len(names) == len(set(names)) >= 8
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(billing_usage_events_parked_total[5m])")


# --- image ----------------------------------------------------------------------------------
def test_dockerfile_runs_the_cli_with_the_sql_it_needs() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "COPY sql /app/sql" in text and "BILLING_SQL_DIR=/app/sql" in text
    assert 'ENTRYPOINT ["billing"]' in text and "-c constraints.txt" in text
    assert re.search(r"^USER \d+", text, re.MULTILINE), "runs as a non-root user"
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"COPY of a missing path: {source}"


def dockerignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker compiles it (moby/patternmatcher): ``*`` and ``?`` stop
    at ``/``, ``**`` crosses directories, and a pattern is anchored at the context's root."""
    pattern = posixpath.normpath(pattern).lstrip("/")
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            regex, i = regex + pattern[i : end + 1], end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex)


def dockerignored(path: str, lines: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: the last pattern matching it
    or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for line in lines:
        negated = line.startswith("!")
        regex = dockerignore_pattern(line.removeprefix("!"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_what_the_image_copies_and_nothing_local() -> None:
    context = (DEPLOY / compose()["x-billing"]["build"]["context"]).resolve()
    assert context == ROOT, "the .dockerignore must be at the root of the build context"
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    left_out = [
        ".git/HEAD", ".venv/bin/python", ".mypy_cache/3.11/billing/settings.data.json",
        ".ruff_cache/0.8.0/123", ".pytest_cache/v/cache/lastfailed",
        "billing/__pycache__/settings.cpython-311.pyc", "workers/__pycache__/app.cpython-311.pyc",
        "tests/unit/__pycache__/test_deploy.cpython-311.pyc", "gateway_billing.egg-info/PKG-INFO",
        "bench/results/gateway-frames-run-ah.json", ".billing/pg/PG_VERSION",
        "deploy/billing.env", "deploy/rabbitmq.env", "deploy/k8s/secret.yaml",
    ]  # fmt: skip
    kept_anyway = [p for p in left_out if not dockerignored(p, lines)]
    assert not kept_anyway, f"sent to the Docker daemon: {kept_anyway}"
    copied: list[str] = []
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                path = ROOT / source
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                copied += [str(f.relative_to(ROOT)) for f in files if "__pycache__" not in f.parts]
    assert {"pyproject.toml", "billing/settings.py", "workers/app.py"} <= set(copied)
    assert any(c.startswith("sql/") for c in copied)
    missing = [c for c in copied if dockerignored(c, lines)]
    assert not missing, f"the Dockerfile copies files .dockerignore leaves out: {missing}"
    # Docker's rules, not .gitignore's: a bare name only matches at the root
    assert not dockerignored("billing/__pycache__/x.pyc", ["__pycache__"])
    assert dockerignored("__pycache__/x.pyc", ["__pycache__"])


def test_kustomize_reads_definitions_from_inside_its_folder() -> None:
    """kustomize refuses files outside the kustomization's folder: its copy of the RabbitMQ
    definitions must stay the same bytes as deploy/rabbitmq/definitions.json."""
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = [f for g in kustomization["configMapGenerator"] for f in g["files"]]
    assert files == ["definitions.json=rabbitmq-definitions.json"]
    copy = DEPLOY / "k8s" / "rabbitmq-definitions.json"
    assert copy.read_bytes() == (DEPLOY / "rabbitmq" / "definitions.json").read_bytes()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_fleet() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, check=True
    ).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
    assert kinds.count("Deployment") == 4 and "ConfigMap" in kinds
