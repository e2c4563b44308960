"""Unit tests for routers.config.load_config (no Ray needed)."""

from __future__ import annotations

import pytest

from routelens.routers.config import TracerConfig, load_config

DEFAULTS = TracerConfig()


def test_empty_kwargs_and_env_give_defaults():
    """With nothing set, every field keeps its default and no problem is reported."""
    config, passthrough = load_config({}, environ={})
    assert config == DEFAULTS
    assert config.problems == ()
    assert passthrough == {}


def test_env_vars_are_read():
    """ROUTELENS_* variables set the matching fields, converted to their types."""
    env = {
        "ROUTELENS_COLLECTOR_URL": "http://collector:8000",
        "ROUTELENS_TOKEN": "s3cret",
        "ROUTELENS_SAMPLE_RATE": "0.25",
        "ROUTELENS_QUEUE_MAX_EVENTS": "500",
        "ROUTELENS_FLUSH_INTERVAL_S": "0.2",
        "ROUTELENS_SPOOL_DIR": "/tmp/elsewhere",
    }
    config, _ = load_config({}, environ=env)
    assert config.collector_url == "http://collector:8000"
    assert config.token == "s3cret"
    assert config.sample_rate == 0.25
    assert config.queue_max_events == 500
    assert config.flush_interval_s == 0.2
    assert config.spool_dir == "/tmp/elsewhere"
    assert config.problems == ()


def test_kwargs_win_over_env():
    """A key given in request_router_kwargs overrides the same ROUTELENS_* variable."""
    env = {"ROUTELENS_SAMPLE_RATE": "0.1", "ROUTELENS_TOKEN": "from-env", "ROUTELENS_BATCH_MAX_EVENTS": "7"}
    config, _ = load_config({"sample_rate": 0.9, "token": "from-kwargs"}, environ=env)
    assert config.sample_rate == 0.9
    assert config.token == "from-kwargs"
    assert config.batch_max_events == 7  # not in kwargs: the env still applies


def test_bad_kwarg_does_not_fall_back_to_env():
    """A bad kwarg is replaced by the default, not by the env value it shadows."""
    config, _ = load_config({"sample_rate": 5}, environ={"ROUTELENS_SAMPLE_RATE": "0.5"})
    assert config.sample_rate == DEFAULTS.sample_rate
    assert len(config.problems) == 1 and "sample_rate" in config.problems[0]


def test_unrelated_env_vars_are_ignored():
    """Variables without the prefix or naming no field change nothing."""
    env = {"SAMPLE_RATE": "0.5", "ROUTELENS_NOT_A_FIELD": "x", "ROUTELENS_PROBLEMS": "('x',)"}
    config, _ = load_config({}, environ=env)
    assert config == DEFAULTS


def test_passthrough_keeps_only_foreign_keys():
    """Keys the tracer does not own are returned untouched for the wrapped router."""
    marker = object()
    kwargs = {"sample_rate": 0.5, "labels": "a=b", "prefer_local": True, "custom": marker}
    config, passthrough = load_config(kwargs, environ={})
    assert passthrough == {"prefer_local": True, "custom": marker}
    assert passthrough["custom"] is marker
    assert config.sample_rate == 0.5


def test_load_config_does_not_mutate_kwargs():
    """The caller's kwargs dict is left as it was."""
    kwargs = {"sample_rate": 0.5, "other": 1}
    load_config(kwargs, environ={})
    assert kwargs == {"sample_rate": 0.5, "other": 1}


@pytest.mark.parametrize(
    "raw",
    [
        "team=infra,region=eu",
        " team = infra , region=eu ,",
        '{"team": "infra", "region": "eu"}',
        {"team": "infra", "region": "eu"},
    ],
)
def test_labels_parsed_from_pairs_json_and_dict(raw):
    """Labels are accepted as k=v pairs, a JSON object string, or a dict."""
    config, _ = load_config({"labels": raw}, environ={})
    assert config.labels == {"team": "infra", "region": "eu"}
    assert config.problems == ()


def test_labels_from_env():
    """ROUTELENS_LABELS is parsed like the kwarg."""
    config, _ = load_config({}, environ={"ROUTELENS_LABELS": '{"zone": "a"}'})
    assert config.labels == {"zone": "a"}


def test_label_values_become_strings():
    """Non-string keys and values of a mapping are converted to str."""
    config, _ = load_config({"labels": {"n": 1, 2: True}}, environ={})
    assert config.labels == {"n": "1", "2": "True"}


def test_empty_labels_string_is_no_labels():
    """An empty or blank labels string is an empty mapping, not a problem."""
    config, _ = load_config({"labels": "  "}, environ={})
    assert config.labels == {}
    assert config.problems == ()


@pytest.mark.parametrize("raw", ["team", "team=infra,region", "{not json", "[1, 2]", "[]", 42, ["a=b"]])
def test_malformed_labels_reported_and_defaulted(raw):
    """Malformed labels are reported in problems and replaced by {}; nothing raises."""
    config, _ = load_config({"labels": raw}, environ={})
    assert config.labels == {}
    assert len(config.problems) == 1
    assert "labels" in config.problems[0]


@pytest.mark.parametrize(
    "key,value",
    [
        ("sample_rate", 2),
        ("sample_rate", -0.1),
        ("sample_rate", "half"),
        ("queue_max_events", -5),
        ("queue_max_events", 0),
        ("batch_max_events", "many"),
        ("spool_max_bytes", -1),
        ("flush_interval_s", -1.0),
        ("http_timeout_s", 0),
        ("collector_url", "ftp://collector:21"),
        ("collector_url", "collector:8000"),
        ("collector_url", "http://"),
        ("collector_url", "not a url"),
    ],
)
def test_bad_values_reported_and_defaulted(key, value):
    """A bad value is named in problems and replaced by the field's default."""
    config, _ = load_config({key: value}, environ={})
    assert getattr(config, key) == getattr(DEFAULTS, key)
    assert len(config.problems) == 1
    assert key in config.problems[0]
    assert repr(value) in config.problems[0]


def test_bad_env_value_names_the_variable():
    """A bad env value is reported under its ROUTELENS_* name."""
    config, _ = load_config({}, environ={"ROUTELENS_QUEUE_MAX_EVENTS": "-3"})
    assert config.queue_max_events == DEFAULTS.queue_max_events
    assert config.problems and "ROUTELENS_QUEUE_MAX_EVENTS" in config.problems[0]


def test_each_bad_value_is_reported_good_ones_kept():
    """Several bad values give several problems; good values alongside them still apply."""
    kwargs = {"sample_rate": 2, "queue_max_events": -1, "token": "ok", "collector_url": "ftp://x"}
    config, _ = load_config(kwargs, environ={"ROUTELENS_LABELS": "oops"})
    assert len(config.problems) == 4
    assert config.token == "ok"
    assert config.sample_rate == DEFAULTS.sample_rate
    assert config.collector_url == ""


@pytest.mark.parametrize("url", ["http://collector:8000", "https://collector.example.com/base"])
def test_valid_collector_urls_accepted(url):
    """http and https URLs with a host are kept as given."""
    config, _ = load_config({"collector_url": url}, environ={})
    assert config.collector_url == url
    assert config.problems == ()


def test_sample_rate_bounds_are_inclusive():
    """0 and 1 are valid sample rates."""
    assert load_config({"sample_rate": 0}, environ={})[0].sample_rate == 0.0
    assert load_config({"sample_rate": "1"}, environ={})[0].sample_rate == 1.0


def test_destination_key_depends_on_collector_url():
    """Without a collector the destination is the JSONL path, with one it is the HTTP target."""
    jsonl, _ = load_config({"jsonl_path": "/tmp/x.jsonl"}, environ={})
    http, _ = load_config({"collector_url": "http://c:1", "token": "t", "spool_dir": "/s"}, environ={})
    assert jsonl.destination_key == ("jsonl", "/tmp/x.jsonl")
    assert http.destination_key == ("http", "http://c:1", "t", "/s")


@pytest.mark.parametrize("key,raw", [("flush_interval_s", "nan"), ("http_timeout_s", "nan"), ("http_timeout_s", "inf")])
def test_non_finite_durations_are_reported(key, raw):
    """NaN or infinite durations are bad values, reported and defaulted."""
    config, _ = load_config({}, environ={"ROUTELENS_" + key.upper(): raw})
    assert getattr(config, key) == getattr(DEFAULTS, key)
    assert config.problems


@pytest.mark.parametrize(
    "key,value",
    [("queue_max_events", float("inf")), pytest.param("flush_interval_s", 10**400, id="flush_interval_s-10**400")],
)
def test_overflowing_numbers_never_raise(key, value):
    """Numbers too large to convert are reported, not raised."""
    config, _ = load_config({key: value}, environ={})
    assert config.problems


@pytest.mark.parametrize("url", ["http://collector:99999", "http://collector:abc"])
def test_collector_url_with_bad_port_is_reported(url):
    """A URL whose port CollectorClient refuses is reported by the config, not accepted."""
    config, _ = load_config({"collector_url": url}, environ={})
    assert config.collector_url == ""
    assert config.problems
