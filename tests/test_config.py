"""``load_config``: sources, defaults, durations, validation of every field, env overrides.

Checks CONTRACT.md §4 ("Configuration (TOML)") and the problem-line shape of §2 ("one line per
problem naming the key"). Every call passes ``env=`` so the real environment never matters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import Config, ConfigError, load_config
from gateway.config import (
    IdempotencyConfig,
    IdentityConfig,
    RateLimitPolicy,
    ServerConfig,
    StoreConfig,
    UpstreamConfig,
)

NO_ENV: dict[str, str] = {}

# The example of CONTRACT.md §4, verbatim.
CONTRACT_EXAMPLE = """\
[server]                      # gateway serve only
host = "127.0.0.1"
port = 8080
workers = 1

[upstream]                    # gateway serve only: where requests go
url = "http://127.0.0.1:9000"
connect_timeout = "2s"
timeout = "30s"

[store]
url = "redis://127.0.0.1:6379/0"   # "memory://" = embedded, one process only; "rediss://" for TLS
cluster = false                     # true: url names one node of a Redis Cluster
timeout = "100ms"                   # bound on one store call
key_prefix = "gw"

[identity]
sources = ["header:x-api-key", "ip"]   # the first that yields a value identifies the client
trusted_proxies = []                   # CIDRs whose X-Forwarded-For is believed; none by default

[[rate_limit]]
name = "per-client"           # shown in headers and metrics
limit = 100                   # tokens refilled per period
period = "1m"
burst = 100                   # bucket size; defaults to limit
cost = 1                      # tokens one request takes
key = "identity"              # identity | ip | global | header:NAME
paths = ["/"]                 # path prefixes, by segment: "/api" is /api and /api/..., not /apiary
methods = []                  # empty = all methods
on_store_error = "allow"      # allow | deny

[idempotency]
header = "Idempotency-Key"
methods = ["POST", "PATCH"]
ttl = "24h"                   # how long a completed response is replayed
lock_ttl = "60s"              # how long an in-flight claim outlives a dead holder
on_lost_claim = "unknown"     # unknown (at most once) | retry (at least once)
required_paths = []           # path prefixes (by segment) where a missing key is a 400
max_body_bytes = 1048576      # request bodies and stored responses
on_store_error = "deny"       # deny | allow
"""


def load(data: Any, env: dict[str, str] | None = None) -> Config:
    """``load_config`` with an explicit (empty by default) environment."""
    return load_config(data, env=NO_ENV if env is None else env)


def problems(data: Any, env: dict[str, str] | None = None) -> tuple[str, ...]:
    """The problem lines of a config that must be rejected."""
    with pytest.raises(ConfigError) as info:
        load(data, env)
    assert info.value.problems, "a ConfigError must carry at least one problem"
    return info.value.problems


def keys_of(lines: tuple[str, ...]) -> set[str]:
    """The key each problem line starts with (everything before the first ": ")."""
    return {line.split(": ", 1)[0] for line in lines}


def only_problem(data: Any, env: dict[str, str] | None = None) -> str:
    """The single problem line of a config with exactly one mistake."""
    lines = problems(data, env)
    assert len(lines) == 1, lines
    return lines[0]


def policy(**fields: Any) -> dict[str, Any]:
    """A config dict with one ``[[rate_limit]]`` table made of ``fields``."""
    return {"rate_limit": [fields]}


def one_policy(**fields: Any) -> RateLimitPolicy:
    """The typed policy of a valid one-policy config."""
    (p,) = load(policy(**fields)).rate_limits
    return p


# ------------------------------------------------------------------------------------ sources
class TestSources:
    def test_toml_path_as_str(self, tmp_path: Path) -> None:
        """A TOML path given as a str is read and parsed."""
        path = tmp_path / "gw.toml"
        path.write_text('[server]\nport = 9123\n[[rate_limit]]\nname = "a"\nlimit = 3\n')
        cfg = load(str(path))
        assert cfg.server.port == 9123
        assert [p.name for p in cfg.rate_limits] == ["a"]

    def test_toml_path_as_pathlike(self, tmp_path: Path) -> None:
        """A TOML path given as an os.PathLike is read and parsed."""
        path = tmp_path / "gw.toml"
        path.write_text('[store]\nkey_prefix = "app"\n')
        assert load(path).store.key_prefix == "app"

    def test_dict_of_the_same_shape(self) -> None:
        """A dict shaped like the TOML gives the same Config as the TOML file."""
        data = {"server": {"port": 9123}, "rate_limit": [{"name": "a", "limit": 3}]}
        cfg = load(data)
        assert cfg.server.port == 9123
        assert cfg.rate_limits[0].limit == 3

    def test_dict_and_file_agree(self, tmp_path: Path) -> None:
        """The contract's example TOML and its dict form load to equal Configs."""
        path = tmp_path / "gw.toml"
        path.write_text(CONTRACT_EXAMPLE)
        assert load(path) == load(tomllib.loads(CONTRACT_EXAMPLE))

    def test_config_returned_unchanged(self) -> None:
        """A Config passed in is returned as the very same object."""
        cfg = load({"server": {"port": 1234}})
        assert load_config(cfg, env=NO_ENV) is cfg

    def test_none_gives_defaults(self) -> None:
        """None gives the default Config, the same as an empty dict."""
        assert load(None) == Config()
        assert load({}) == Config()

    def test_no_argument_gives_defaults(self) -> None:
        """load_config() with no source at all gives the defaults."""
        assert load_config(env=NO_ENV) == Config()

    def test_contract_example_is_valid(self, tmp_path: Path) -> None:
        """The full example of CONTRACT §4 is valid and yields the values it spells out."""
        path = tmp_path / "gateway.toml"
        path.write_text(CONTRACT_EXAMPLE)
        cfg = load(path)
        assert cfg.server == ServerConfig(host="127.0.0.1", port=8080, workers=1)
        assert cfg.upstream == UpstreamConfig(
            url="http://127.0.0.1:9000", connect_timeout_s=2.0, timeout_s=30.0
        )
        assert cfg.store == StoreConfig(
            url="redis://127.0.0.1:6379/0", cluster=False, timeout_s=0.1, key_prefix="gw"
        )
        assert cfg.identity == IdentityConfig(
            sources=("header:x-api-key", "ip"), trusted_proxies=()
        )
        assert cfg.rate_limits == (
            RateLimitPolicy(
                name="per-client", limit=100, period_ms=60_000, burst=100, cost=1, key="identity",
                paths=("/",), methods=frozenset(), on_store_error="allow",
            ),
        )
        assert cfg.idempotency == IdempotencyConfig(
            header="Idempotency-Key", methods=frozenset({"POST", "PATCH"}), ttl_s=86_400.0,
            lock_ttl_s=60.0, on_lost_claim="unknown", required_paths=(), max_body_bytes=1_048_576,
            on_store_error="deny",
        )

    def test_config_error_is_a_value_error(self) -> None:
        """ConfigError is a ValueError whose message joins its problem lines."""
        with pytest.raises(ValueError, match=r"server\.port") as info:
            load({"server": {"port": -1}})
        assert isinstance(info.value, ConfigError)
        assert str(info.value) == "; ".join(info.value.problems)


# ------------------------------------------------------------------------------------ defaults
class TestDefaults:
    def test_server_defaults(self) -> None:
        """[server] defaults to 127.0.0.1:8080 with one worker."""
        s = load(None).server
        assert (s.host, s.port, s.workers) == ("127.0.0.1", 8080, 1)

    def test_upstream_defaults(self) -> None:
        """[upstream] defaults to http://127.0.0.1:9000, 2s connect and 30s timeouts."""
        u = load(None).upstream
        assert (u.url, u.connect_timeout_s, u.timeout_s) == ("http://127.0.0.1:9000", 2.0, 30.0)

    def test_store_defaults_to_embedded(self) -> None:
        """[store] defaults to the embedded memory:// store, no cluster, 100ms, prefix gw."""
        s = load(None).store
        assert (s.url, s.cluster, s.timeout_s, s.key_prefix) == ("memory://", False, 0.1, "gw")

    def test_identity_defaults(self) -> None:
        """[identity] defaults to the x-api-key header then the IP, and no trusted proxy."""
        i = load(None).identity
        assert i.sources == ("header:x-api-key", "ip")
        assert i.trusted_proxies == ()

    def test_no_rate_limit_by_default(self) -> None:
        """Without [[rate_limit]] tables there is no rate limit at all."""
        assert load(None).rate_limits == ()

    def test_policy_defaults(self) -> None:
        """An empty [[rate_limit]] table gets every default the contract documents."""
        p = one_policy()
        assert p.name == "per-client"
        assert p.limit == 100
        assert p.period_ms == 60_000
        assert p.burst == 100
        assert p.cost == 1
        assert p.key == "identity"
        assert p.paths == ("/",)
        assert p.methods == frozenset()
        assert p.on_store_error == "allow"

    def test_burst_defaults_to_limit(self) -> None:
        """A policy without burst gets a bucket of exactly `limit` tokens."""
        assert one_policy(limit=7).burst == 7
        assert one_policy(limit=7, burst=20).burst == 20

    def test_idempotency_defaults(self) -> None:
        """[idempotency] defaults match the contract's example values."""
        i = load(None).idempotency
        assert i.header == "Idempotency-Key"
        assert i.methods == frozenset({"POST", "PATCH"})
        assert i.ttl_s == 86_400.0
        assert i.lock_ttl_s == 60.0
        assert i.on_lost_claim == "unknown"
        assert i.required_paths == ()
        assert i.max_body_bytes == 1_048_576
        assert i.on_store_error == "deny"

    def test_minimal_config_is_valid(self) -> None:
        """Only `[store] url = "memory://"` and one [[rate_limit]] is a valid config."""
        cfg = load({"store": {"url": "memory://"}, "rate_limit": [{"name": "p", "limit": 10}]})
        assert cfg.store.url == "memory://"
        assert [(p.name, p.limit, p.burst) for p in cfg.rate_limits] == [("p", 10, 10)]
        assert cfg.idempotency == IdempotencyConfig()

    def test_minimal_config_file_is_valid(self, tmp_path: Path) -> None:
        """The minimal config as a TOML file loads too."""
        path = tmp_path / "min.toml"
        path.write_text('[store]\nurl = "memory://"\n\n[[rate_limit]]\nlimit = 10\nperiod = "1s"\n')
        (p,) = load(path).rate_limits
        assert (p.limit, p.period_ms, p.burst) == (10, 1000, 10)

    @pytest.mark.parametrize(
        "obj",
        [
            ServerConfig(), UpstreamConfig(), StoreConfig(), IdentityConfig(), RateLimitPolicy(),
            IdempotencyConfig(), Config(),
        ],
        ids=lambda o: type(o).__name__,
    )
    def test_sections_are_frozen(self, obj: object) -> None:
        """Assigning to a field of any config dataclass raises FrozenInstanceError."""
        name = dataclasses.fields(obj)[0].name  # type: ignore[arg-type]
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)

    def test_loaded_config_is_frozen(self) -> None:
        """The Config that load_config returns cannot be changed in place either."""
        cfg = load(policy(limit=5))
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.store.url = "redis://x"  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.rate_limits[0].limit = 6  # type: ignore[misc]

    def test_typed_values(self) -> None:
        """Lists become tuples and method lists frozensets, so a Config is hashable."""
        cfg = load({
            "identity": {"sources": ["ip"], "trusted_proxies": ["10.0.0.0/8"]},
            "rate_limit": [{"paths": ["/a"], "methods": ["GET"]}],
            "idempotency": {"methods": ["POST"], "required_paths": ["/p"]},
        })
        assert isinstance(cfg.identity.sources, tuple)
        assert isinstance(cfg.identity.trusted_proxies, tuple)
        assert isinstance(cfg.rate_limits, tuple)
        assert isinstance(cfg.rate_limits[0].paths, tuple)
        assert isinstance(cfg.rate_limits[0].methods, frozenset)
        assert isinstance(cfg.idempotency.methods, frozenset)
        assert isinstance(cfg.idempotency.required_paths, tuple)
        assert isinstance(hash(cfg), int)


# ------------------------------------------------------------------------------------ durations
UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}

# (section, key, attribute) of every duration field outside [[rate_limit]]
DURATION_FIELDS = [
    ("upstream", "connect_timeout", "connect_timeout_s"),
    ("upstream", "timeout", "timeout_s"),
    ("store", "timeout", "timeout_s"),
    ("store", "breaker_cooldown", "breaker_cooldown_s"),
    ("idempotency", "ttl", "ttl_s"),
    ("idempotency", "lock_ttl", "lock_ttl_s"),
    ("idempotency", "completion_timeout", "completion_timeout_s"),
]

# (section, key, attribute, lowest value in seconds, the same as written): every duration's
# lower bound; one just under it is refused, as a string or as a number of seconds
LOWER_BOUNDS = [
    ("upstream", "connect_timeout", "connect_timeout_s", 0.001, "1ms"),
    ("upstream", "timeout", "timeout_s", 0.001, "1ms"),
    ("store", "timeout", "timeout_s", 0.001, "1ms"),
    ("store", "breaker_cooldown", "breaker_cooldown_s", 0.001, "1ms"),
    ("idempotency", "ttl", "ttl_s", 1.0, "1s"),
    ("idempotency", "lock_ttl", "lock_ttl_s", 0.1, "100ms"),
    ("idempotency", "completion_timeout", "completion_timeout_s", 0.1, "100ms"),
]

# spaces anywhere and digits other than ASCII 0-9 (Arabic-Indic, fullwidth, mathematical bold)
UNSPACED_ASCII_ONLY = [" 5m", "5m ", "5 m", "\t5m", "5m\n", "5\u00a0m", "1.5 s", "\u0663s", "\uff15s",
                       "\U0001d7d3s", "1.\u0665s"]

BAD_DURATIONS = ["fast", "", "-1s", "0s", 0, True, "1 week", "2", "1e3s", [1], -5, *UNSPACED_ASCII_ONLY]


class TestDurations:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("250ms", 0.25), ("2s", 2.0), ("5m", 300.0), ("24h", 86_400.0), ("7d", 604_800.0),
            ("1.5s", 1.5), ("0.5m", 30.0), (30, 30.0), (0.25, 0.25), (2.5, 2.5),
        ],
    )
    def test_seconds_fields(self, text: Any, seconds: float) -> None:
        """Duration strings and plain numbers of seconds normalise to float seconds (on
        lock_ttl, which takes 100ms to years)."""
        lock_ttl = load({"idempotency": {"lock_ttl": text}}).idempotency.lock_ttl_s
        assert isinstance(lock_ttl, float)
        assert math.isclose(lock_ttl, seconds)

    @pytest.mark.parametrize(
        ("text", "ms"),
        [
            ("250ms", 250), ("2s", 2000), ("5m", 300_000), ("24h", 86_400_000),
            ("7d", 604_800_000), (2, 2000), (0.25, 250), (1.5, 1500), ("1ms", 1),
        ],
    )
    def test_period_in_ms(self, text: Any, ms: int) -> None:
        """A policy's period normalises to whole milliseconds in period_ms."""
        period_ms = one_policy(period=text).period_ms
        assert isinstance(period_ms, int)
        assert period_ms == ms

    @pytest.mark.parametrize(("section", "key", "attr"), DURATION_FIELDS)
    def test_every_duration_field_takes_units(self, section: str, key: str, attr: str) -> None:
        """Every duration key accepts "1500ms" and a plain 2.5 and stores seconds."""
        assert getattr(getattr(load({section: {key: "1500ms"}}), section), attr) == 1.5
        assert getattr(getattr(load({section: {key: 2.5}}), section), attr) == 2.5

    @pytest.mark.parametrize("bad", BAD_DURATIONS, ids=repr)
    def test_bad_period_names_the_key(self, bad: Any) -> None:
        """A bad period is one problem line starting with `rate_limit[0].period: `."""
        line = only_problem(policy(period=bad))
        assert line.startswith("rate_limit[0].period: ")

    @pytest.mark.parametrize(("section", "key", "attr"), DURATION_FIELDS)
    @pytest.mark.parametrize("bad", BAD_DURATIONS, ids=repr)
    def test_bad_duration_in_every_field(self, section: str, key: str, attr: str, bad: Any) -> None:
        """Every duration key rejects the same bad values, naming its full key."""
        line = only_problem({section: {key: bad}})
        assert line.startswith(f"{section}.{key}: ")

    def test_message_shape(self) -> None:
        """An unparsable duration reads `KEY: expected a duration like "2s", got VALUE`."""
        assert only_problem(policy(period="fast")) == (
            'rate_limit[0].period: expected a duration like "2s", got "fast"'
        )
        assert only_problem({"idempotency": {"ttl": True}}) == (
            'idempotency.ttl: expected a duration like "2s", got True'
        )

    def test_message_names_the_policy_index(self) -> None:
        """The index in the key is the position of the [[rate_limit]] table, from 0."""
        line = only_problem({"rate_limit": [{"name": "a"}, {"name": "b", "period": "fast"}]})
        assert line == 'rate_limit[1].period: expected a duration like "2s", got "fast"'

    @pytest.mark.parametrize("bad", [0, "0s", "0ms", -1, float("nan"), float("inf")], ids=repr)
    def test_zero_negative_and_non_finite_rejected(self, bad: Any) -> None:
        """Zero, negative, NaN and infinite durations are rejected, naming the key."""
        line = only_problem({"idempotency": {"lock_ttl": bad}})
        assert line.startswith("idempotency.lock_ttl: ")

    @pytest.mark.parametrize("bad", ["99ms", 0.05], ids=repr)
    def test_lock_ttl_below_100ms_rejected(self, bad: Any) -> None:
        """A lease under 100ms (renewed every third of it) is rejected with its bound."""
        line = only_problem({"idempotency": {"lock_ttl": bad}})
        assert line.startswith("idempotency.lock_ttl: must be at least 0.1s")

    def test_period_below_one_millisecond_rejected(self) -> None:
        """A period shorter than 1ms cannot be expressed in period_ms and is rejected."""
        assert only_problem(policy(period="0.1ms")).startswith("rate_limit[0].period: ")

    @given(
        whole=st.integers(min_value=0, max_value=10**7),
        fraction=st.one_of(st.none(), st.text(alphabet="0123456789", min_size=1, max_size=6)),
        unit=st.sampled_from(sorted(UNIT_S)),
    )
    def test_property_number_times_unit(self, whole: int, fraction: str | None, unit: str) -> None:
        """Any "<number><unit>" parses to number * unit seconds when in range (ttl: 1s to 1e9s)."""
        number = f"{whole}" if fraction is None else f"{whole}.{fraction}"
        expected = float(number) * UNIT_S[unit]
        data = {"idempotency": {"ttl": f"{number}{unit}"}}
        if 1 <= expected <= 1e9:
            assert math.isclose(load(data).idempotency.ttl_s, expected, rel_tol=1e-12)
        else:
            line = only_problem(data)
            assert line.startswith("idempotency.ttl: ")


class TestDurationBounds:
    """Every duration has a lower bound (1ms at the least), for strings and numbers alike:
    a shorter timeout fails every call, a shorter ttl cannot dedupe a retry."""

    def test_issue_values_are_refused_naming_key_and_bound(self) -> None:
        """A ttl or store.timeout of "0.0000001ms" is one line naming the key and its range."""
        assert only_problem({"idempotency": {"ttl": "0.0000001ms"}}) == (
            'idempotency.ttl: must be at least 1s and at most 1e+09s, got "0.0000001ms"'
        )
        assert only_problem({"store": {"timeout": "0.0000001ms"}}) == (
            'store.timeout: must be at least 0.001s and at most 60s, got "0.0000001ms"'
        )

    @pytest.mark.parametrize(("section", "key", "attr", "low", "text"), LOWER_BOUNDS)
    def test_lowest_value_accepted(self, section: str, key: str, attr: str, low: float, text: str) -> None:
        """The bound itself is accepted, written with a unit or as a number of seconds."""
        assert getattr(getattr(load({section: {key: text}}), section), attr) == low
        assert getattr(getattr(load({section: {key: low}}), section), attr) == low

    @pytest.mark.parametrize("under", ["string", "number", "tiny"])
    @pytest.mark.parametrize(("section", "key", "attr", "low", "text"), LOWER_BOUNDS)
    def test_under_the_lowest_value_refused(
        self, section: str, key: str, attr: str, low: float, text: str, under: str
    ) -> None:
        """Just under the bound (as "<ms>ms" or seconds) or far under it is refused, naming
        the key and the bound."""
        value: Any = {"string": f"{low * 999:g}ms", "number": low * 0.999, "tiny": 1e-10}[under]
        line = only_problem({section: {key: value}})
        assert line.startswith(f"{section}.{key}: must be at least {low:g}s and at most ")

    @pytest.mark.parametrize("value", ["0.9ms", "0.0000001ms", 0.0009, 1e-7, "0.00001s"], ids=repr)
    def test_period_under_one_millisecond_refused(self, value: Any) -> None:
        """A policy's period below 1ms is refused with its bound, however it is written."""
        assert only_problem(policy(period=value)).startswith(
            "rate_limit[0].period: must be at least 0.001s and at most "
        )

    @pytest.mark.parametrize(("section", "key", "attr"), [*DURATION_FIELDS, ("rate_limit", "period", "")])
    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=repr)
    def test_non_finite_refused_in_every_field(self, section: str, key: str, attr: str, bad: float) -> None:
        """NaN and infinities are refused in every duration key, naming it."""
        data = policy(period=bad) if section == "rate_limit" else {section: {key: bad}}
        name = "rate_limit[0].period" if section == "rate_limit" else f"{section}.{key}"
        assert only_problem(data).startswith(f"{name}: ")

    @pytest.mark.parametrize("bad", UNSPACED_ASCII_ONLY, ids=repr)
    def test_spaces_and_non_ascii_digits_are_not_durations(self, bad: str) -> None:
        """A duration with a space anywhere or a non-ASCII digit is not a duration."""
        assert only_problem({"idempotency": {"ttl": bad}}) == (
            f'idempotency.ttl: expected a duration like "2s", got {json.dumps(bad)}'
        )

    @pytest.mark.parametrize("key", ["connect_timeout", "timeout"])
    def test_upstream_timeouts_at_most_an_hour(self, key: str) -> None:
        """upstream.connect_timeout and upstream.timeout take up to 1h, not more."""
        assert getattr(load({"upstream": {key: "1h"}}).upstream, f"{key}_s") == 3600.0
        assert getattr(load({"upstream": {key: 3600}}).upstream, f"{key}_s") == 3600.0
        for bad in ("61m", 3601):
            assert only_problem({"upstream": {key: bad}}) == (
                f"upstream.{key}: must be at least 0.001s and at most 3600s, got {json.dumps(bad)}"
            )

    def test_ttl_may_be_shorter_than_lock_ttl(self) -> None:
        """ttl counts from the completion (a claimed record lives lock_ttl + ttl), so a 1s ttl
        stands with the default 60s lock_ttl."""
        i = load({"idempotency": {"ttl": "1s"}}).idempotency
        assert (i.ttl_s, i.lock_ttl_s) == (1.0, 60.0)


# ------------------------------------------------------------------------------------ window_s
class TestWindow:
    @pytest.mark.parametrize(
        ("period_ms", "window"),
        [(1500, 2), (60_000, 60), (1000, 1), (1001, 2), (250, 1), (1, 1), (86_400_000, 86_400)],
    )
    def test_window_rounds_up(self, period_ms: int, window: int) -> None:
        """window_s is the period in whole seconds, rounded up."""
        assert RateLimitPolicy(period_ms=period_ms).window_s == window

    def test_window_from_loaded_policy(self) -> None:
        """A loaded "1500ms" policy advertises w=2 and a "1m" policy w=60."""
        assert one_policy(period="1500ms").window_s == 2
        assert one_policy(period="1m").window_s == 60


# ------------------------------------------------------------------------------------ unknown keys
class TestUnknownKeys:
    @pytest.mark.parametrize(
        ("data", "key"),
        [
            ({"extra": 1}, "extra"),
            ({"rate_limits": [{"limit": 5}]}, "rate_limits"),
            ({"server": {"hostname": "x"}}, "server.hostname"),
            ({"upstream": {"read_timeout": "1s"}}, "upstream.read_timeout"),
            ({"store": {"password": "x"}}, "store.password"),
            ({"identity": {"source": ["ip"]}}, "identity.source"),
            ({"idempotency": {"ttl_s": 5}}, "idempotency.ttl_s"),
            ({"rate_limit": [{"limt": 5}]}, "rate_limit[0].limt"),
            (
                {"rate_limit": [{"name": "a"}, {"name": "b", "period_ms": 5}]},
                "rate_limit[1].period_ms",
            ),
        ],
    )
    def test_unknown_key_is_an_error(self, data: dict[str, Any], key: str) -> None:
        """An unknown key at any level is one problem naming its full key."""
        assert only_problem(data) == f"{key}: unknown key"

    def test_every_unknown_key_is_reported(self) -> None:
        """Several unknown keys in several sections are all reported."""
        lines = problems(
            {"a": 1, "server": {"b": 1}, "rate_limit": [{"c": 1}], "idempotency": {"d": 1}}
        )
        assert set(lines) == {
            "a: unknown key", "server.b: unknown key", "rate_limit[0].c: unknown key",
            "idempotency.d: unknown key",
        }

    @pytest.mark.parametrize("section", ["server", "upstream", "store", "identity", "idempotency"])
    def test_section_must_be_a_table(self, section: str) -> None:
        """A section that is not a table is a problem naming the section."""
        assert only_problem({section: 5}).startswith(f"{section}: ")

    def test_rate_limit_must_be_an_array_of_tables(self) -> None:
        """`[rate_limit]` (one table) instead of `[[rate_limit]]` is a problem naming the key."""
        assert only_problem({"rate_limit": {"limit": 5}}).startswith("rate_limit: ")
        assert only_problem({"rate_limit": "x"}).startswith("rate_limit: ")
        assert only_problem({"rate_limit": [5]}).startswith("rate_limit[0]: ")


# ------------------------------------------------------------------------------------ all at once
class TestAllProblemsAtOnce:
    def test_every_mistake_in_one_error(self) -> None:
        """One ConfigError lists every bad key of a config with several mistakes."""
        data = {
            "typo": True,
            "server": {"port": 70_000, "workers": 0},
            "upstream": {"url": "ftp://x"},
            "store": {"timeout": "fast", "key_prefix": "{gw}"},
            "identity": {"sources": [], "trusted_proxies": ["10.0.0.0/8", "not-a-net"]},
            "rate_limit": [
                {"name": "ok", "period": "soon"},
                {"name": "bad name", "limit": 0, "key": "user"},
            ],
            "idempotency": {"on_lost_claim": "maybe", "max_body_bytes": -1},
        }
        lines = problems(data)
        assert keys_of(lines) == {
            "typo",
            "server.port",
            "server.workers",
            "upstream.url",
            "store.timeout",
            "store.key_prefix",
            "identity.sources",
            "identity.trusted_proxies[1]",
            "rate_limit[0].period",
            "rate_limit[1].name",
            "rate_limit[1].limit",
            "rate_limit[1].key",
            "idempotency.on_lost_claim",
            "idempotency.max_body_bytes",
        }
        assert len(lines) == 14

    def test_problems_from_a_file_at_once(self, tmp_path: Path) -> None:
        """A TOML file with three mistakes gives one error with three lines."""
        path = tmp_path / "bad.toml"
        path.write_text('[server]\nport = "80"\n[[rate_limit]]\nperiod = "fast"\ncost = 0\n')
        with pytest.raises(ConfigError) as info:
            load(path)
        assert keys_of(info.value.problems) == {
            "server.port", "rate_limit[0].period", "rate_limit[0].cost",
        }

    def test_each_problem_is_one_line(self) -> None:
        """No problem line contains a line break, even when the bad value has one."""
        lines = problems({"server": {"host": 5}, "store": {"url": "no\nscheme"}})
        assert all("\n" not in line for line in lines)
        assert keys_of(lines) == {"server.host", "store.url"}


# ------------------------------------------------------------------------------------ rate_limit
class TestRateLimitPolicy:
    @pytest.mark.parametrize("name", ["per-client", "a", "A.b_c-9", "0", "x" * 64])
    def test_good_names(self, name: str) -> None:
        """Names of 1-64 letters, digits, dot, underscore and dash are accepted."""
        assert one_policy(name=name).name == name

    @pytest.mark.parametrize(
        "name", ["", "-x", ".x", "_x", "has space", "x" * 65, "naïve", 'a"b', "a;b", "a,b", 5],
        ids=repr,
    )
    def test_bad_names(self, name: Any) -> None:
        """Names outside that charset (they go into header values) are rejected."""
        assert only_problem(policy(name=name)).startswith("rate_limit[0].name: ")

    def test_duplicate_names(self) -> None:
        """Two policies with the same name are a problem at the second one's name."""
        line = only_problem({"rate_limit": [{"name": "a"}, {"name": "b"}, {"name": "a"}]})
        assert line.startswith("rate_limit[2].name: ")
        assert "duplicate" in line

    def test_two_unnamed_policies_collide(self) -> None:
        """Two policies both left on the default name are duplicates too."""
        assert keys_of(problems({"rate_limit": [{}, {}]})) == {"rate_limit[1].name"}

    @pytest.mark.parametrize("field", ["limit", "burst", "cost"])
    @pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10", 2**50 + 1], ids=repr)
    def test_count_bounds(self, field: str, bad: Any) -> None:
        """limit, burst and cost must be whole numbers from 1 to 2^50."""
        lines = problems(policy(**{field: bad}))
        assert f"rate_limit[0].{field}" in keys_of(lines)

    def test_count_lower_bound_accepted(self) -> None:
        """limit = burst = cost = 1 is the smallest valid policy."""
        p = one_policy(limit=1, burst=1, cost=1)
        assert (p.limit, p.burst, p.cost) == (1, 1, 1)

    def test_cost_above_burst_rejected(self) -> None:
        """A cost larger than the bucket could never pass, so it is rejected at cost."""
        line = only_problem(policy(limit=10, burst=5, cost=6))
        assert line.startswith("rate_limit[0].cost: ")

    def test_cost_above_defaulted_burst_rejected(self) -> None:
        """Cost is compared with the burst that defaults to limit."""
        assert only_problem(policy(limit=3, cost=4)).startswith("rate_limit[0].cost: ")

    def test_cost_equal_to_burst_accepted(self) -> None:
        """cost == burst is allowed: one request empties a full bucket."""
        assert one_policy(limit=10, burst=5, cost=5).cost == 5

    @pytest.mark.parametrize(
        ("key", "normalised"),
        [
            ("identity", "identity"), ("ip", "ip"), ("global", "global"),
            ("header:X-Tenant", "header:x-tenant"), ("header:x-api-key", "header:x-api-key"),
        ],
    )
    def test_good_keys(self, key: str, normalised: str) -> None:
        """The four key kinds are accepted; a header name is normalised to lowercase."""
        assert one_policy(key=key).key == normalised

    @pytest.mark.parametrize(
        "key", ["user", "IP", "Identity", "header:", "header: ", "header:a b", "cookie:x", "", 5],
        ids=repr,
    )
    def test_bad_keys(self, key: Any) -> None:
        """Anything but identity, ip, global or header:NAME is rejected, naming the key."""
        assert only_problem(policy(key=key)).startswith("rate_limit[0].key: ")

    @pytest.mark.parametrize(
        ("paths", "normalised"),
        [
            (["/"], ("/",)),
            (["/api/"], ("/api",)),
            (["/api", "/v1/charges/"], ("/api", "/v1/charges")),
            (["/api/", "/api"], ("/api",)),
        ],
    )
    def test_paths_normalised(self, paths: list[str], normalised: tuple[str, ...]) -> None:
        """Path prefixes lose a trailing slash ("/" stays "/") and become a tuple."""
        assert one_policy(paths=paths).paths == normalised

    @pytest.mark.parametrize(
        ("paths", "key"),
        [
            (["api"], "rate_limit[0].paths[0]"),
            (["/ok", "v1"], "rate_limit[0].paths[1]"),
            ([""], "rate_limit[0].paths[0]"),
            (["/a b"], "rate_limit[0].paths[0]"),
            (["/a?x=1"], "rate_limit[0].paths[0]"),
            ([5], "rate_limit[0].paths[0]"),
            ([], "rate_limit[0].paths"),
            ("/api", "rate_limit[0].paths"),
        ],
        ids=repr,
    )
    def test_bad_paths(self, paths: Any, key: str) -> None:
        """A path that does not start with "/", an empty list, or a non-list is rejected."""
        assert only_problem(policy(paths=paths)).startswith(f"{key}: ")

    def test_methods_uppercased(self) -> None:
        """Methods are uppercased into a frozenset; an empty list means all methods."""
        assert one_policy(methods=["get", "Post", "DELETE"]).methods == {"GET", "POST", "DELETE"}
        assert one_policy(methods=[]).methods == frozenset()

    @pytest.mark.parametrize("methods", [["GE T"], [""], [5], "GET"], ids=repr)
    def test_bad_methods(self, methods: Any) -> None:
        """A method that is not an HTTP token, or a non-list, is rejected, naming the key."""
        assert only_problem(policy(methods=methods)).startswith("rate_limit[0].methods")

    @pytest.mark.parametrize("value", ["allow", "deny"])
    def test_on_store_error_choices(self, value: str) -> None:
        """on_store_error takes allow or deny."""
        assert one_policy(on_store_error=value).on_store_error == value

    @pytest.mark.parametrize("value", ["ignore", "Allow", True, ""], ids=repr)
    def test_on_store_error_other_rejected(self, value: Any) -> None:
        """Any other on_store_error is rejected, naming the key."""
        line = only_problem(policy(on_store_error=value))
        assert line.startswith("rate_limit[0].on_store_error: ")


# ------------------------------------------------------------------------------------ identity
class TestIdentity:
    def test_sources_normalised(self) -> None:
        """Sources keep their order and header names are lowercased."""
        cfg = load({"identity": {"sources": ["header:X-API-Key", "ip"]}})
        assert cfg.identity.sources == ("header:x-api-key", "ip")
        assert load({"identity": {"sources": ["ip"]}}).identity.sources == ("ip",)

    def test_empty_sources_rejected(self) -> None:
        """An empty source list could identify nobody and is rejected."""
        assert only_problem({"identity": {"sources": []}}).startswith("identity.sources: ")

    @pytest.mark.parametrize(
        ("sources", "key"),
        [
            (["ip", "ip"], "identity.sources[1]"),
            (["header:X-Key", "header:x-key"], "identity.sources[1]"),
            (["cookie:"], "identity.sources[0]"),
            (["cookie:a b"], "identity.sources[0]"),
            (["Bearer"], "identity.sources[0]"),
            (["jwt:"], "identity.sources[0]"),
            (["jwt:sub"], "identity.sources[0]"),  # no [identity.jwt] to verify it with
            (["cookie:s", "cookie:s"], "identity.sources[1]"),
            (["ip", "identity"], "identity.sources[1]"),
            (["header:"], "identity.sources[0]"),
            ([5], "identity.sources[0]"),
            ("ip", "identity.sources"),
        ],
        ids=repr,
    )
    def test_bad_sources(self, sources: Any, key: str) -> None:
        """Duplicates (after normalisation) and unknown sources are rejected by index."""
        assert only_problem({"identity": {"sources": sources}}).startswith(f"{key}: ")

    def test_trusted_proxies_normalised(self) -> None:
        """Trusted proxies become normalised CIDRs, IPv4 and IPv6."""
        nets = ["10.0.0.1/8", "192.168.1.7", "::1", "2001:db8::/32"]
        cfg = load({"identity": {"trusted_proxies": nets}})
        assert cfg.identity.trusted_proxies == (
            "10.0.0.0/8", "192.168.1.7/32", "::1/128", "2001:db8::/32",
        )

    @pytest.mark.parametrize(
        ("nets", "key"),
        [
            (["10.0.0.0/8", "not-a-net"], "identity.trusted_proxies[1]"),
            (["10.0.0.0/33"], "identity.trusted_proxies[0]"),
            (["300.1.1.1"], "identity.trusted_proxies[0]"),
            ([""], "identity.trusted_proxies[0]"),
            ([10], "identity.trusted_proxies[0]"),
            ("10.0.0.0/8", "identity.trusted_proxies"),
        ],
        ids=repr,
    )
    def test_bad_trusted_proxies(self, nets: Any, key: str) -> None:
        """An invalid CIDR is rejected with its index in the key."""
        assert only_problem({"identity": {"trusted_proxies": nets}}).startswith(f"{key}: ")


# ------------------------------------------------------------------------------------ store
class TestStore:
    @pytest.mark.parametrize(
        "url",
        [
            "memory://", "redis://127.0.0.1:6379/0", "redis://localhost", "rediss://cache.example:6380/1",
            "redis://user:secret@10.0.0.5:6379/2", "unix:///var/run/redis.sock",
        ],
    )
    def test_good_urls(self, url: str) -> None:
        """memory://, redis://, rediss:// and unix:// URLs are accepted as written."""
        assert load({"store": {"url": url}}).store.url == url

    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:6379", "memcached://x", "memory://x", "memory", "redis://",
            "redis://h:6379/abc", "redis://h:99999", "unix://", "", "127.0.0.1:6379", 6379,
        ],
        ids=repr,
    )
    def test_bad_urls(self, url: Any) -> None:
        """Other schemes and malformed URLs are rejected at store.url."""
        assert only_problem({"store": {"url": url}}).startswith("store.url: ")

    def test_cluster_with_redis(self) -> None:
        """cluster = true is accepted with a redis:// or rediss:// node URL."""
        for url in ("redis://node1:7000", "rediss://node1:7000"):
            assert load({"store": {"url": url, "cluster": True}}).store.cluster is True

    @pytest.mark.parametrize(
        "store",
        [{"url": "memory://", "cluster": True}, {"cluster": True}],
        ids=["explicit", "default"],
    )
    def test_cluster_with_memory_rejected(self, store: dict[str, Any]) -> None:
        """A cluster on the embedded memory:// store is rejected at store.cluster."""
        assert only_problem({"store": store}).startswith("store.cluster: ")

    def test_cluster_must_be_boolean(self) -> None:
        """cluster takes true or false, not a string."""
        assert only_problem({"store": {"cluster": "yes"}}).startswith("store.cluster: ")

    @pytest.mark.parametrize(
        ("timeout", "seconds"), [("100ms", 0.1), ("1ms", 0.001), ("60s", 60.0)]
    )
    def test_timeout_bounds_accepted(self, timeout: str, seconds: float) -> None:
        """store.timeout accepts durations up to 60s."""
        assert load({"store": {"timeout": timeout}}).store.timeout_s == seconds

    @pytest.mark.parametrize("timeout", ["61s", "1h", "0s", 0], ids=repr)
    def test_timeout_bounds_rejected(self, timeout: Any) -> None:
        """store.timeout above 60s or not positive is rejected."""
        assert only_problem({"store": {"timeout": timeout}}).startswith("store.timeout: ")

    @pytest.mark.parametrize("prefix", ["gw", "app:gw-1.x_y", "x" * 64, "A"])
    def test_good_key_prefix(self, prefix: str) -> None:
        """A key prefix of 1-64 characters of A-Z a-z 0-9 . _ : - is accepted."""
        assert load({"store": {"key_prefix": prefix}}).store.key_prefix == prefix

    @pytest.mark.parametrize(
        "prefix", ["{gw}", "gw}", "{", "", "a b", "x" * 65, "gw/1", 5], ids=repr
    )
    def test_bad_key_prefix(self, prefix: Any) -> None:
        """Braces (cluster hash tags) and other characters are rejected in key_prefix."""
        assert only_problem({"store": {"key_prefix": prefix}}).startswith("store.key_prefix: ")


# ------------------------------------------------------------------------------------ upstream
class TestUpstream:
    @pytest.mark.parametrize(
        "url", ["http://127.0.0.1:9000", "https://api.example.com", "http://[::1]:8000/base"]
    )
    def test_good_urls(self, url: str) -> None:
        """http:// and https:// upstream URLs are accepted as written."""
        assert load({"upstream": {"url": url}}).upstream.url == url

    @pytest.mark.parametrize(
        "url", ["ftp://x", "redis://x:6379", "http://", "127.0.0.1:9000", "http://h:0", "", 9000],
        ids=repr,
    )
    def test_bad_urls(self, url: Any) -> None:
        """Any other scheme, no host, or port 0 is rejected at upstream.url."""
        assert only_problem({"upstream": {"url": url}}).startswith("upstream.url: ")


# ------------------------------------------------------------------------------------ server
class TestServer:
    def test_good_values(self) -> None:
        """host, port and workers within bounds are taken as given."""
        s = load({"server": {"host": "0.0.0.0", "port": 65535, "workers": 512}}).server
        assert (s.host, s.port, s.workers) == ("0.0.0.0", 65535, 512)

    @pytest.mark.parametrize(
        ("key", "bad"),
        [
            ("host", ""), ("host", "  "), ("host", 5),
            ("port", 65536), ("port", -1), ("port", "8080"), ("port", 80.0), ("port", True),
            ("workers", 0), ("workers", 513), ("workers", 1.5),
            ("header_timeout", "50ms"), ("header_timeout", "11m"), ("header_timeout", "1 s"),
            ("max_connections", 0), ("max_connections", 1_000_001), ("max_connections", "10"),
        ],
        ids=repr,
    )
    def test_bad_values(self, key: str, bad: Any) -> None:
        """Out-of-range or mistyped server values are rejected, naming the key."""
        assert only_problem({"server": {key: bad}}).startswith(f"server.{key}: ")

    def test_connection_bounds(self) -> None:
        """A request head has 10 s by default and a worker 1024 connections; both can be set."""
        assert (ServerConfig().header_timeout_s, ServerConfig().max_connections) == (10.0, 1024)
        s = load({"server": {"header_timeout": "100ms", "max_connections": 1}}).server
        assert (s.header_timeout_s, s.max_connections) == (0.1, 1)
        s = load({"server": {"header_timeout": "10m", "max_connections": 1_000_000}}).server
        assert (s.header_timeout_s, s.max_connections) == (600.0, 1_000_000)


class TestRequest:
    def test_paths_are_normalised_by_default(self) -> None:
        assert load({}).request.path_normalization == "normalize"
        assert load({"request": {"path_normalization": "reject"}}).request.path_normalization == "reject"

    @pytest.mark.parametrize("bad", ["off", "", 1, "Reject"])
    def test_other_rules_are_refused(self, bad: Any) -> None:
        problem = only_problem({"request": {"path_normalization": bad}})
        assert problem.startswith("request.path_normalization: ")

    def test_unknown_keys_are_refused(self) -> None:
        assert only_problem({"request": {"normalize": True}}).startswith("request.normalize")


# ------------------------------------------------------------------------------------ idempotency
class TestIdempotency:
    def test_good_values(self) -> None:
        """Every [idempotency] field takes a valid value and normalises it."""
        i = load({
            "idempotency": {
                "header": "X-Idem-Key", "methods": ["post", "Put"], "ttl": "7d", "lock_ttl": "30s",
                "on_lost_claim": "retry", "required_paths": ["/payments/", "/orders"],
                "max_body_bytes": 0, "on_store_error": "allow",
            }
        }).idempotency
        assert i.header == "X-Idem-Key"
        assert i.methods == frozenset({"POST", "PUT"})
        assert i.ttl_s == 604_800.0
        assert i.lock_ttl_s == 30.0
        assert i.on_lost_claim == "retry"
        assert i.required_paths == ("/payments", "/orders")
        assert i.max_body_bytes == 0
        assert i.on_store_error == "allow"

    def test_max_body_bytes_upper_bound(self) -> None:
        """max_body_bytes accepts 2^31 and rejects 2^31 + 1."""
        assert load({"idempotency": {"max_body_bytes": 2**31}}).idempotency.max_body_bytes == 2**31
        line = only_problem({"idempotency": {"max_body_bytes": 2**31 + 1}})
        assert line.startswith("idempotency.max_body_bytes: ")

    @pytest.mark.parametrize(
        ("key", "bad", "where"),
        [
            ("header", "Bad Header", "idempotency.header"),
            ("header", "", "idempotency.header"),
            ("header", "x:y", "idempotency.header"),
            ("header", 5, "idempotency.header"),
            ("methods", ["PO ST"], "idempotency.methods[0]"),
            ("methods", ["POST", 5], "idempotency.methods[1]"),
            ("methods", "POST", "idempotency.methods"),
            ("ttl", "forever", "idempotency.ttl"),
            ("lock_ttl", "0s", "idempotency.lock_ttl"),
            ("on_lost_claim", "sometimes", "idempotency.on_lost_claim"),
            ("on_lost_claim", "Unknown", "idempotency.on_lost_claim"),
            ("required_paths", ["payments"], "idempotency.required_paths[0]"),
            ("required_paths", "/payments", "idempotency.required_paths"),
            ("max_body_bytes", -1, "idempotency.max_body_bytes"),
            ("max_body_bytes", "1MB", "idempotency.max_body_bytes"),
            ("max_body_bytes", 1.5, "idempotency.max_body_bytes"),
            ("on_store_error", "retry", "idempotency.on_store_error"),
        ],
        ids=repr,
    )
    def test_bad_values(self, key: str, bad: Any, where: str) -> None:
        """A bad [idempotency] value is one problem naming its key (with list index)."""
        assert only_problem({"idempotency": {key: bad}}).startswith(f"{where}: ")

    def test_required_paths_may_be_empty(self) -> None:
        """required_paths = [] is allowed (unlike a policy's paths)."""
        assert load({"idempotency": {"required_paths": []}}).idempotency.required_paths == ()


# ------------------------------------------------------------------------------------ environment
class TestEnvironment:
    def test_store_url_override(self) -> None:
        """GATEWAY_STORE_URL replaces store.url from the config."""
        cfg = load({"store": {"url": "memory://"}}, env={"GATEWAY_STORE_URL": "redis://cache:6379/1"})
        assert cfg.store.url == "redis://cache:6379/1"

    def test_upstream_url_override(self) -> None:
        """GATEWAY_UPSTREAM_URL replaces upstream.url from the config."""
        cfg = load({"upstream": {"url": "http://a:1"}}, env={"GATEWAY_UPSTREAM_URL": "https://b"})
        assert cfg.upstream.url == "https://b"

    def test_overrides_apply_to_files_and_defaults(self, tmp_path: Path) -> None:
        """The overrides apply over a TOML file and over the defaults alike."""
        path = tmp_path / "gw.toml"
        path.write_text('[store]\nurl = "memory://"\n')
        env = {"GATEWAY_STORE_URL": "rediss://r:6380", "GATEWAY_UPSTREAM_URL": "http://u:81"}
        from_file = load(path, env=env)
        from_none = load(None, env=env)
        assert (from_file.store.url, from_file.upstream.url) == ("rediss://r:6380", "http://u:81")
        assert (from_none.store.url, from_none.upstream.url) == ("rediss://r:6380", "http://u:81")

    @pytest.mark.parametrize(
        ("var", "value", "prefix"),
        [
            ("GATEWAY_STORE_URL", "bogus", "store.url (from GATEWAY_STORE_URL): "),
            ("GATEWAY_STORE_URL", "http://x", "store.url (from GATEWAY_STORE_URL): "),
            ("GATEWAY_UPSTREAM_URL", "redis://x", "upstream.url (from GATEWAY_UPSTREAM_URL): "),
        ],
    )
    def test_bad_override_names_the_variable(self, var: str, value: str, prefix: str) -> None:
        """A bad override is a problem naming both the key and the variable."""
        line = only_problem({}, env={var: value})
        assert line.startswith(prefix)
        assert f'"{value}"' in line

    def test_empty_variable_ignored(self) -> None:
        """An empty variable does not override the configured value."""
        env = {"GATEWAY_STORE_URL": "", "GATEWAY_UPSTREAM_URL": ""}
        cfg = load({"store": {"url": "redis://h:1"}, "upstream": {"url": "http://u:2"}}, env=env)
        assert (cfg.store.url, cfg.upstream.url) == ("redis://h:1", "http://u:2")

    def test_config_object_not_overridden(self) -> None:
        """A Config passed in is returned unchanged, whatever the environment says."""
        cfg = Config()
        env = {"GATEWAY_STORE_URL": "redis://other:6379", "GATEWAY_UPSTREAM_URL": "x"}
        out = load_config(cfg, env=env)
        assert out is cfg
        assert out.store.url == "memory://"

    def test_other_variables_ignored(self) -> None:
        """Variables other than the two overrides change nothing."""
        assert load(None, env={"GATEWAY_STORE": "redis://x", "STORE_URL": "redis://y"}) == Config()

    def test_reads_os_environ_by_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without env=, the overrides are read from os.environ."""
        monkeypatch.setenv("GATEWAY_STORE_URL", "redis://from-env:6379/3")
        monkeypatch.delenv("GATEWAY_UPSTREAM_URL", raising=False)
        assert load_config({}).store.url == "redis://from-env:6379/3"

    def test_override_combined_with_other_problems(self) -> None:
        """A bad override is reported together with the file's own problems."""
        lines = problems({"server": {"port": -1}}, env={"GATEWAY_UPSTREAM_URL": "nope"})
        assert keys_of(lines) == {"server.port", "upstream.url (from GATEWAY_UPSTREAM_URL)"}


# ------------------------------------------------------------------------------------ files
class TestFiles:
    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is one ConfigError line naming the file."""
        path = tmp_path / "nope.toml"
        with pytest.raises(ConfigError) as info:
            load(path)
        (line,) = info.value.problems
        assert line.startswith(f"{path}: ")
        assert "\n" not in line

    def test_directory_instead_of_file(self, tmp_path: Path) -> None:
        """A directory given as the config is one ConfigError line naming it."""
        with pytest.raises(ConfigError) as info:
            load(tmp_path)
        (line,) = info.value.problems
        assert line.startswith(f"{tmp_path}: ")

    @pytest.mark.parametrize(
        "text", ["[store\n", "a = \n", "[server]\nport = 1\nport = 2\n", 'x = "unterminated\n'],
        ids=["table", "value", "duplicate", "string"],
    )
    def test_syntax_error(self, tmp_path: Path, text: str) -> None:
        """A TOML syntax error is one ConfigError line naming the file, without a traceback."""
        path = tmp_path / "broken.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load(path)
        (line,) = info.value.problems
        assert line.startswith(f"{path}: ")
        assert "\n" not in line
        assert "Traceback" not in line

    def test_empty_file_is_defaults(self, tmp_path: Path) -> None:
        """An empty TOML file is a valid config with every default."""
        path = tmp_path / "empty.toml"
        path.write_text("")
        assert load(path) == Config()


# ------------------------------------------------------------------------------------ edge cases
class TestEdgeCases:
    @pytest.mark.parametrize(
        ("data", "key"),
        [
            (policy(name="per-client\n"), "rate_limit[0].name"),
            ({"store": {"key_prefix": "gw\n"}}, "store.key_prefix"),
            ({"idempotency": {"header": "Idempotency-Key\n"}}, "idempotency.header"),
            ({"idempotency": {"methods": ["POST\n"]}}, "idempotency.methods[0]"),
            (policy(methods=["GET\n"]), "rate_limit[0].methods[0]"),
            (policy(paths=["/api\n"]), "rate_limit[0].paths[0]"),
        ],
        ids=["policy-name", "key-prefix", "idempotency-header", "idempotency-method",
             "policy-method", "policy-path"],
    )
    def test_trailing_newline_rejected(self, data: dict[str, Any], key: str) -> None:
        """A value ending in a newline breaks its charset and must be rejected at its key."""
        assert only_problem(data).startswith(f"{key}: ")

    @pytest.mark.parametrize(
        ("data", "key"),
        [
            ({"upstream": {"url": "http://ex\nample.com"}}, "upstream.url"),
            ({"store": {"url": "redis://cache\t:6379/0"}}, "store.url"),
        ],
        ids=["upstream", "store"],
    )
    def test_url_with_control_character_rejected(self, data: dict[str, Any], key: str) -> None:
        """A URL containing a tab or newline is rejected at its key, not stored verbatim."""
        assert only_problem(data).startswith(f"{key}: ")

    def test_huge_integer_duration_is_a_problem(self) -> None:
        """An integer duration too large for a float is a problem line, not an OverflowError."""
        assert only_problem({"idempotency": {"ttl": 10**400}}).startswith("idempotency.ttl: ")

    def test_bad_url_does_not_blame_cluster(self) -> None:
        """A bad redis URL with cluster = true is one problem (the url), none about cluster."""
        lines = problems({"store": {"url": "rediss://node:6379/x", "cluster": True}})
        assert keys_of(lines) == {"store.url"}


class TestSentinelConfig:
    SENTINELS = ("10.0.0.1:26379", "sentinel-2.example:26379", "[::1]:26380")

    def store(self, **fields: Any) -> dict[str, Any]:
        return {"store": {"url": "redis://ignored/0", "sentinels": list(self.SENTINELS),
                          "service_name": "payments", **fields}}

    def test_sentinels_and_service_name_accepted(self) -> None:
        """sentinels (host:port, IPv6 in brackets) and service_name are kept as written."""
        s = load(self.store(url="rediss://app:secret@ignored:1/2")).store
        assert s.sentinels == self.SENTINELS
        assert s.service_name == "payments"
        assert s.url == "rediss://app:secret@ignored:1/2"

    def test_no_sentinels_by_default(self) -> None:
        """Without them the store is the url's one Redis: no sentinels, no service name."""
        s = load({"store": {"url": "redis://127.0.0.1:6379/0"}}).store
        assert (s.sentinels, s.service_name) == ((), "")

    @pytest.mark.parametrize(
        ("entry", "why"),
        [("10.0.0.1", "no port"), ("10.0.0.1:0", "port 0"), ("10.0.0.1:65536", "port too big"),
         (":26379", "no host"), ("10.0.0.1:26379 ", "trailing space"), ("host:port", "not a number"),
         ("::1:26379", "bare IPv6"), (26379, "a number"), ("redis://10.0.0.1:26379", "a URL")],
        ids=str,
    )
    def test_bad_sentinel_entry(self, entry: Any, why: str) -> None:
        """Each sentinel must be host:port with a port 1-65535; the line names its index."""
        line = only_problem(self.store(sentinels=["10.0.0.9:26379", entry]))
        assert line.startswith("store.sentinels[1]: expected \"host:port\""), why

    def test_duplicate_sentinel(self) -> None:
        """The same sentinel twice is a mistake, named at the second one."""
        line = only_problem(self.store(sentinels=["10.0.0.1:26379", "10.0.0.1:26379"]))
        assert line.startswith("store.sentinels[1]: duplicate")

    def test_sentinels_must_be_a_list(self) -> None:
        """One string is not a list of sentinels."""
        line = only_problem(self.store(sentinels="10.0.0.1:26379"))
        assert line.startswith("store.sentinels: expected a list")

    def test_sentinels_without_service_name(self) -> None:
        """Sentinels alone cannot name a master: service_name is required with them."""
        line = only_problem({"store": {"url": "redis://ignored/0", "sentinels": list(self.SENTINELS)}})
        assert line.startswith("store.service_name: required")

    def test_service_name_without_sentinels(self) -> None:
        """A service name without sentinels would be silently ignored: it is a problem."""
        line = only_problem({"store": {"url": "redis://127.0.0.1:6379/0", "service_name": "payments"}})
        assert line.startswith("store.service_name: only used with sentinels")

    def test_empty_service_name(self) -> None:
        """An empty service name is one problem (the value), not also 'required'."""
        line = only_problem(self.store(service_name=""))
        assert line.startswith("store.service_name: expected a non-empty")

    def test_sentinels_with_cluster(self) -> None:
        """A cluster fails over by itself: sentinels with cluster = true are a problem."""
        assert only_problem(self.store(cluster=True)).startswith("store.sentinels: not with cluster")

    @pytest.mark.parametrize("url", ["memory://", "unix:///var/run/redis.sock", None])
    def test_sentinels_need_a_redis_url(self, url: str | None) -> None:
        """memory:// (also the default url) and unix:// have no master for sentinels to name."""
        data = self.store(url=url)
        if url is None:
            del data["store"]["url"]
        assert only_problem(data).startswith("store.sentinels: need a redis:// or rediss:// store.url")

    def test_bad_url_does_not_blame_sentinels(self) -> None:
        """A malformed url with sentinels is one problem, at the url."""
        assert keys_of(problems(self.store(url="redis://h:6379/abc"))) == {"store.url"}

    def test_bad_sentinel_does_not_blame_service_name(self) -> None:
        """Service name with only bad sentinels: the sentinel's line, not 'only used with sentinels'."""
        assert keys_of(problems(self.store(sentinels=["nope"]))) == {"store.sentinels[0]"}

    def test_environment_url_with_sentinels(self) -> None:
        """GATEWAY_STORE_URL still sets the scheme, credentials and database beside sentinels."""
        data = self.store()
        del data["store"]["url"]
        s = load(data, env={"GATEWAY_STORE_URL": "rediss://u:p@any:1/5"}).store
        assert (s.url, s.sentinels) == ("rediss://u:p@any:1/5", self.SENTINELS)


class TestStoreBoundsConfig:
    def test_defaults(self) -> None:
        """64 connections, a breaker that opens after 5 failures and cools down for 1 s."""
        s = load({}).store
        assert (s.max_connections, s.breaker_failures, s.breaker_cooldown_s) == (64, 5, 1.0)

    def test_values_are_read(self) -> None:
        """The three keys take an integer, an integer and a duration (or seconds)."""
        s = load({"store": {"max_connections": 8, "breaker_failures": 2, "breaker_cooldown": "250ms"}}).store
        assert (s.max_connections, s.breaker_failures, s.breaker_cooldown_s) == (8, 2, 0.25)
        assert load({"store": {"breaker_cooldown": 3}}).store.breaker_cooldown_s == 3.0

    @pytest.mark.parametrize(("key", "value"), [
        ("max_connections", 0), ("max_connections", "many"), ("max_connections", 10_001),
        ("breaker_failures", 0), ("breaker_failures", 1.5),
        ("breaker_cooldown", "0s"), ("breaker_cooldown", "soon"), ("breaker_cooldown", "2h"),
    ])
    def test_bad_values_name_the_key(self, key: str, value: Any) -> None:
        """A value out of range or of the wrong kind is one problem naming store.<key>."""
        assert only_problem({"store": {key: value}}).startswith(f"store.{key}: ")


def test_a_method_no_client_sends_is_refused_with_its_key() -> None:
    """``methods = ["PSOT"]`` would be a policy that never matches: refused, naming the key, with
    the registered method it is closest to; registered methods in any case are accepted."""
    with pytest.raises(ConfigError) as info:
        load_config({"rate_limit": [{"methods": ["PSOT", "get", "FOO"]}],
                     "concurrency_limit": [{"methods": ["DELTE"]}],
                     "idempotency": {"methods": ["PATCH", "POTS"]}})
    lines = info.value.problems
    assert 'rate_limit[0].methods[0]: not a registered HTTP method: "PSOT" (did you mean "POST"?)' in lines
    assert 'rate_limit[0].methods[2]: not a registered HTTP method: "FOO"' in lines
    assert any(line.startswith("concurrency_limit[0].methods[0]:") and '"DELETE"' in line for line in lines)
    assert any(line.startswith("idempotency.methods[1]:") for line in lines)
    assert not any("methods[1]" in line and "rate_limit" in line for line in lines)  # "get" is GET
    ok = load_config({"rate_limit": [{"methods": ["get", "PROPFIND", "PURGE", "QUERY"]}]})
    assert ok.rate_limits[0].methods == frozenset({"GET", "PROPFIND", "PURGE", "QUERY"})
