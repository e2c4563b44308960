"""A real Prometheus server (Debian's `prometheus` package) for the tests:
its own configuration, storage and port in a temporary directory, scraping
the targets it is given and evaluating the rule files it is given; queried
through its HTTP API. Skipped without Prometheus, except in CI (see
scripts/system-deps.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tests.support.ports import free_port
from tests.support.system_deps import require

BINARIES = ("prometheus", "promtool")


class PrometheusUnavailable(RuntimeError):
    pass


def check_available() -> None:
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        raise PrometheusUnavailable(f"{' and '.join(missing)} not found (apt-get install prometheus)")


def need_prometheus() -> None:
    """In a test: skip it without Prometheus (fail it in CI)."""
    require(check_available, PrometheusUnavailable, "CI must test with Prometheus", "Prometheus unavailable")


class PrometheusServer:
    """`targets`: host:port of collectors, scraped every `scrape_interval_s` at /metrics
    (job "routelens", with `token` as bearer token when given); `rule_files`: paths."""

    def __init__(self, targets: Sequence[str], rule_files: Sequence[str] = (), token: Optional[str] = None,
                 scrape_interval_s: float = 1.0, evaluation_interval_s: float = 1.0):
        check_available()
        self.dir = tempfile.mkdtemp(prefix="routelens-prometheus-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        job: Dict[str, Any] = {"job_name": "routelens", "metrics_path": "/metrics",
                               "static_configs": [{"targets": list(targets)}]}
        if token:
            job["authorization"] = {"type": "Bearer", "credentials": token}
        config = {"global": {"scrape_interval": f"{int(scrape_interval_s * 1000)}ms",
                             "scrape_timeout": f"{int(scrape_interval_s * 1000)}ms",
                             "evaluation_interval": f"{int(evaluation_interval_s * 1000)}ms"},
                  "rule_files": [os.path.abspath(path) for path in rule_files],
                  "scrape_configs": [job]}
        self.config = os.path.join(self.dir, "prometheus.yml")
        with open(self.config, "w") as out:
            json.dump(config, out)  # JSON is YAML
        self.log = open(os.path.join(self.dir, "prometheus.log"), "w+")
        self.process: Optional[subprocess.Popen] = None

    def __enter__(self) -> "PrometheusServer":
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={self.config}", f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"prometheus did not start:\n{self.log_text()}")
            time.sleep(0.2)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log.name) as log:
            return log.read()

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str, at: Optional[float] = None) -> List[dict]:
        """An instant query's result: [{"metric": labels, "value": [ts, "value"]}, ...]."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        assert data["resultType"] == "vector", data
        return data["result"]

    def samples(self, selector: str, seconds: float, at: Optional[float] = None) -> List[dict]:
        """Raw samples of the `seconds` up to `at` (default: now):
        [{"metric": labels, "values": [[ts, "value"], ...]}, ...]."""
        params = {"query": f"{selector}[{round(seconds * 1000)}ms]"}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def alerts(self) -> List[dict]:
        return self.api("alerts")["alerts"]

    def fired(self, since: float, until: float) -> List[dict]:
        """The labels of every alert that was firing at some rule evaluation in (since, until],
        from the ALERTS series Prometheus keeps of them (alerts firing once, resolved since, included)."""
        seconds = round((until - since) * 1000)
        return [series["metric"] for series in
                self.query(f'max_over_time(ALERTS{{alertstate="firing"}}[{seconds}ms])', at=until)]

    def rule_groups(self) -> List[dict]:
        return self.api("rules")["groups"]

    def wait_for(self, condition, timeout_s: float, what: str, every_s: float = 0.25):
        deadline = time.monotonic() + timeout_s
        while True:
            found = condition()
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(every_s)


# --- the project's rules and Grafana dashboard, as the tests use them ---

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(ROOT, "docs", "prometheus", "routelens-alerts.yml")
DASHBOARD = os.path.join(ROOT, "docs", "grafana", "routelens.json")


def shortened_rules(directory: str, window: str = "20s", hour: str = "2m") -> str:
    """The rule file with its windows cut to seconds and without `for` delays, so
    that a test sees alerts fire within its traffic; thresholds are unchanged.
    Returns the new file's path."""
    import yaml

    with open(RULES) as rules:
        document = yaml.safe_load(rules)
    for group in document["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            for long in ("[5m]", "[10m]"):
                expr = expr.replace(long, f"[{window}]")
            rule["expr"] = expr.replace("[1h]", f"[{hour}]").replace("offset 5m", f"offset {window}")
            if "for" in rule:
                rule["for"] = "0s"
    path = os.path.join(directory, "routelens-alerts-short.yml")
    with open(path, "w") as out:
        yaml.safe_dump(document, out)
    return path


def alert_key(labels: Dict[str, str]) -> Tuple[str, Optional[str]]:
    """An alert as (its name, what it is about: the source, else the replica, else the deployment)."""
    return labels["alertname"], labels.get("source_id") or labels.get("replica") or labels.get("deployment")


def rule_exprs() -> Dict[str, str]:
    """Each recording rule's and alert's name -> its expression, as shipped."""
    import yaml

    with open(RULES) as rules:
        document = yaml.safe_load(rules)
    return {rule.get("record") or rule["alert"]: rule["expr"] for group in document["groups"]
            for rule in group["rules"]}


def dashboard_queries() -> Dict[str, List[str]]:
    """Each Grafana panel's title -> its queries, as shipped (Grafana's variables in them)."""
    with open(DASHBOARD) as dashboard:
        panels = json.load(dashboard)["panels"]
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in panels
            if panel["type"] != "row"}


def grafana_expr(expr: str, range_s: str, rate_interval: str = "20s", app: str = ".*",
                 deployment: str = ".*") -> str:
    """A dashboard query as Grafana sends it, its variables given (`range_s`: $__range, e.g. "123456ms")."""
    return (expr.replace("$__range", range_s).replace("$__rate_interval", rate_interval)
            .replace("$app", app).replace("$deployment", deployment))
