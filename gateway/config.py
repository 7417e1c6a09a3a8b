"""The gateway's configuration: frozen, typed sections and ``load_config``.

``load_config`` takes a TOML path, a dict of the same shape, or a ``Config``, applies the
environment overrides (``GATEWAY_STORE_URL``, ``GATEWAY_UPSTREAM_URL``) and returns a ``Config``,
or raises one ``ConfigError`` listing every problem, each naming its key
(``rate_limit[1].period: expected a duration like "2s", got "fast"``; list indexes count from 0).
Reading a section is ``gateway/_config_read.py``'s job; this module owns the shapes and defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway._config_read import Reader, Table, show
from gateway.errors import ConfigError

__all__ = [
    "ENV_OVERRIDES",
    "LOOPBACK",
    "ConcurrencyLimit",
    "Config",
    "ErrorsConfig",
    "FleetShedding",
    "IdempotencyConfig",
    "IdentityConfig",
    "IdentitySource",
    "JwtConfig",
    "LocalShedding",
    "OpsConfig",
    "PlanLimits",
    "PriorityClass",
    "RateLimitPolicy",
    "RequestConfig",
    "ResponseConfig",
    "ServerConfig",
    "SheddingConfig",
    "SourceFunction",
    "StoreConfig",
    "UpstreamConfig",
    "load_config",
]

OnStoreError = Literal["allow", "deny"]
OnLostClaim = Literal["unknown", "retry"]
PolicyMode = Literal["enforce", "shadow"]
PathNormalization = Literal["normalize", "reject"]
LimitMode = Literal["enforce", "shadow"]
_LIMIT_MODES: tuple[LimitMode, ...] = ("enforce", "shadow")
_PATH_NORMALIZATION: tuple[PathNormalization, ...] = ("normalize", "reject")
_ON_STORE_ERROR: tuple[OnStoreError, ...] = ("allow", "deny")
_ON_LOST_CLAIM: tuple[OnLostClaim, ...] = ("unknown", "retry")
_POLICY_MODE: tuple[PolicyMode, ...] = ("enforce", "shadow")
Fingerprint = Literal["raw", "json"]
_FINGERPRINT: tuple[Fingerprint, ...] = ("raw", "json")
OnInFlight = Literal["conflict", "wait"]
_ON_IN_FLIGHT: tuple[OnInFlight, ...] = ("conflict", "wait")
ErrorFormat = Literal["problem", "stripe"]
_ERROR_FORMAT: tuple[ErrorFormat, ...] = ("problem", "stripe")
RateLimitHeaders = Literal["ietf", "ietf+legacy", "none"]
_RATE_LIMIT_HEADERS: tuple[RateLimitHeaders, ...] = ("ietf", "ietf+legacy", "none")

#: Environment variables that override one key each, as container deploys expect.
ENV_OVERRIDES: Mapping[str, tuple[str, str]] = {
    "GATEWAY_STORE_URL": ("store", "url"),
    "GATEWAY_UPSTREAM_URL": ("upstream", "url"),
}

# Token counts in ratelimit_take.lua are integers in units of 1/unit token; Lua numbers are
# doubles, exact below 2^53. Keeping burst * unit under 2^50 leaves room for the refill sums.
_EXACT_LIMIT = 2**50
_OPS_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~-]+)+")
_PLAN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """``[server]``: where ``gateway serve`` listens, and what a connection may hold of it."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    header_timeout_s: float = 10.0  # from ready-for-a-request to a whole request head
    max_connections: int = 1024  # open connections per worker process; past it 503 and close


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestConfig:
    """``[request]``: which requests the gateway refuses before any decision is made."""

    path_normalization: PathNormalization = "normalize"
    limit_preflights: bool = False  # CORS preflights pass the rate and concurrency limits


#: Loopback, IPv4 and IPv6: who may read ``/_gateway/metrics`` unless ``ops.metrics_allow`` says.
LOOPBACK = ("127.0.0.0/8", "::1/128")
_EVERYONE = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True, slots=True, kw_only=True)
class OpsConfig:
    """``[ops]``: where the gateway's own routes (health, readiness, metrics) are, and who may
    reach them. Metrics are the gateway's internals (policy names, traffic, store errors): by
    default only loopback reads them, in-process and under ``gateway serve``."""

    enabled: bool = True
    prefix: str = "/_gateway"
    allow: tuple[str, ...] = _EVERYONE  # healthz and readyz (probes come from the node or LB)
    metrics_allow: tuple[str, ...] = LOOPBACK


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    """``[upstream]``: where ``gateway serve`` forwards requests."""

    url: str = "http://127.0.0.1:9000"
    connect_timeout_s: float = 2.0
    timeout_s: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    """``[store]``: the Redis (or embedded ``memory://``) that holds buckets and records."""

    url: str = "memory://"
    cluster: bool = False
    sentinels: tuple[str, ...] = ()  # "host:port" of Redis Sentinels; they name the master
    service_name: str = ""  # the name the sentinels monitor the master under
    timeout_s: float = 0.1
    key_prefix: str = "gw"
    max_connections: int = 64  # per process (per node on a cluster); past it calls wait
    breaker_failures: int = 5  # consecutive failed calls that open the circuit breaker
    breaker_cooldown_s: float = 1.0  # how long an open breaker fails calls fast before a probe


#: An in-process identity (or plan) source: called with the request's ASGI scope, it returns
#: the value (``str`` or ``bytes``; None for none), or an awaitable of it.
SourceFunction = Callable[[Mapping[str, Any]], Any]
#: A source: ``"ip"``, ``"header:NAME"``, ``"cookie:NAME"``, ``"bearer"``, ``"jwt:CLAIM"``, or a
#: ``SourceFunction`` (in-process).
IdentitySource = str | SourceFunction


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtConfig:
    """``[identity.jwt]``: how the ``jwt:CLAIM`` sources verify a bearer JWT (``bearer.py``).

    ``key`` is one PEM public key (or an HMAC secret: then never shown in a repr), ``jwks`` a
    JWKS document; exactly one is set, read from ``key``/``key_file``/``jwks_file`` at load."""

    algorithms: tuple[str, ...]
    key: bytes | None = field(default=None, repr=False)
    jwks: str | None = field(default=None, repr=False)
    audience: tuple[str, ...] = ()
    issuer: str = ""
    leeway_s: float = 10.0
    require_exp: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityConfig:
    """``[identity]``: how a client is recognised; the first source with a value wins."""

    sources: tuple[IdentitySource, ...] = ("header:x-api-key", "ip")
    trusted_proxies: tuple[str, ...] = ()
    jwt: JwtConfig | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanLimits:
    """One entry of a policy's ``plans``: the numbers a client on plan ``name`` gets."""

    name: str
    limit: int
    burst: int
    cost: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitPolicy:
    """One ``[[rate_limit]]``: a token bucket of ``burst`` tokens refilled at limit/period.

    ``mode = "shadow"`` decides and counts the policy exactly as enforcing it would (its bucket
    is charged only when the request would pass with it enforced), but never refuses a request
    for it and never shows it in the response's ``RateLimit`` fields: a dark launch."""

    name: str = "per-client"
    limit: int = 100
    period_ms: int = 60_000
    burst: int = 100
    cost: int = 1
    key: str = "identity"
    paths: tuple[str, ...] = ("/",)
    methods: frozenset[str] = frozenset()
    exempt_paths: tuple[str, ...] = ()  # taken back out of ``paths``
    exempt_methods: frozenset[str] = frozenset()  # taken back out of ``methods``
    on_store_error: OnStoreError = "allow"
    mode: PolicyMode = "enforce"
    # where the client's plan is read (jwt:CLAIM, header:NAME from trusted proxies, a callable),
    # and each plan's numbers; a client on no listed plan gets the policy's own
    plan: IdentitySource | None = None
    plans: tuple[PlanLimits, ...] = ()

    def on_plan(self, name: str) -> RateLimitPolicy:
        """This policy with the numbers of plan ``name`` (its own when no plan has that name)."""
        for p in self.plans:
            if p.name == name:
                return dataclasses.replace(self, limit=p.limit, burst=p.burst, cost=p.cost, plan=None,
                                           plans=())
        return self

    @property
    def shadow(self) -> bool:
        """Whether the policy is only observed (``mode = "shadow"``), not enforced."""
        return self.mode == "shadow"

    @property
    def window_s(self) -> int:
        """The period in whole seconds, rounded up: the ``w`` of ``RateLimit-Policy``."""
        return max(1, math.ceil(self.period_ms / 1000))


@dataclass(frozen=True, slots=True, kw_only=True)
class ConcurrencyLimit:
    """One ``[[concurrency_limit]]``: at most ``limit`` of a client's requests in flight at once.

    A slot is held from admission until the response ends (or the client goes, the app raises,
    the request is cancelled); ``lease`` is how long it outlives a gateway that died holding it."""

    name: str = "concurrent"
    limit: int = 20
    key: str = "identity"
    paths: tuple[str, ...] = ("/",)
    methods: frozenset[str] = frozenset()
    exempt_paths: tuple[str, ...] = ()
    exempt_methods: frozenset[str] = frozenset()
    lease_ms: int = 30_000
    on_store_error: OnStoreError = "allow"
    mode: LimitMode = "enforce"


@dataclass(frozen=True, slots=True, kw_only=True)
class PriorityClass:
    """One ``[[priority]]`` class, listed from the most critical to the most sheddable.

    A request is in the first class whose paths, methods and (when set) header it matches; a
    header match is believed only from ``identity.trusted_proxies``. ``reserve`` is the share of
    the fleet budget kept for this class and those above it: classes below may not use it."""

    name: str
    paths: tuple[str, ...] = ("/",)
    methods: frozenset[str] = frozenset()
    header: tuple[str, str] | None = None  # (lowercase name, value)
    reserve: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetShedding:
    """``[shedding.fleet]``: one in-flight budget counted in the store across every gateway."""

    enabled: bool = False  # the kill switch
    limit: int = 1000  # requests in flight across the fleet
    lease_ms: int = 30_000
    mode: LimitMode = "enforce"
    on_store_error: OnStoreError = "allow"


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalShedding:
    """``[shedding.local]``: this process's own in-flight requests and event-loop lag, no store."""

    enabled: bool = False  # the kill switch
    max_in_flight: int = 256
    max_loop_lag_s: float = 0.1
    mode: LimitMode = "enforce"


@dataclass(frozen=True, slots=True, kw_only=True)
class SheddingConfig:
    """``[shedding]``: which class a request matching no ``[[priority]]`` is in (``"default"``,
    the most sheddable, after every listed class, unless a listed class has that name), and the
    two shedders."""

    default_class: str = "default"
    fleet: FleetShedding = field(default_factory=FleetShedding)
    local: LocalShedding = field(default_factory=LocalShedding)


@dataclass(frozen=True, slots=True, kw_only=True)
class IdempotencyConfig:
    """``[idempotency]``: Idempotency-Key deduplication."""

    header: str = "Idempotency-Key"
    methods: frozenset[str] = frozenset({"POST", "PATCH"})
    ttl_s: float = 86_400.0
    lock_ttl_s: float = 60.0
    on_lost_claim: OnLostClaim = "unknown"
    completion_timeout_s: float = 10.0
    required_paths: tuple[str, ...] = ()
    max_body_bytes: int = 1_048_576
    on_store_error: OnStoreError = "deny"
    fingerprint: Fingerprint = "raw"  # "json": a JSON body's canonical form, not its bytes
    release_statuses: frozenset[int] = frozenset()  # answered, not stored: the key is free again
    on_in_flight: OnInFlight = "conflict"  # "wait": a duplicate waits for the first answer
    wait_timeout_s: float = 10.0  # the longest a duplicate waits before its 409


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorsConfig:
    """``[errors]``: the shape of every response the gateway makes itself."""

    format: ErrorFormat = "problem"  # RFC 9457; "stripe": Stripe's error envelope and statuses


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseConfig:
    """``[response]``: fields the gateway adds to the responses it passes on."""

    rate_limit_headers: RateLimitHeaders = "ietf"  # "ietf+legacy": also X-RateLimit-*; "none"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration; every section has defaults."""

    server: ServerConfig = field(default_factory=ServerConfig)
    request: RequestConfig = field(default_factory=RequestConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    rate_limits: tuple[RateLimitPolicy, ...] = ()
    concurrency_limits: tuple[ConcurrencyLimit, ...] = ()
    priorities: tuple[PriorityClass, ...] = ()
    shedding: SheddingConfig = field(default_factory=SheddingConfig)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    errors: ErrorsConfig = field(default_factory=ErrorsConfig)
    response: ResponseConfig = field(default_factory=ResponseConfig)


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build a ``Config`` from a TOML path, a dict of the same shape, or a ``Config``.

    Args:
        source: a path to a TOML file, a mapping shaped like the TOML, a ``Config`` (returned
            unchanged), or None for the defaults.
        env: where the environment overrides are read; ``os.environ`` when None.

    Raises:
        ConfigError: with one line per problem, each naming its key.
    """
    if isinstance(source, Config):
        return source
    if source is None:
        data: Mapping[str, Any] = {}
    elif isinstance(source, Mapping):
        data = source
    else:
        data = _read_toml(os.fspath(source))
    return _parse(data, os.environ if env is None else env)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: not UTF-8 ({exc.reason} at byte {exc.start})"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: invalid TOML: nested too deeply"]) from None


def _parse(data: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    reader = Reader()
    root = reader.table(data, "")
    overrides: dict[str, dict[str, tuple[str, str]]] = {s: {} for s, _ in ENV_OVERRIDES.values()}
    for var, (section, key) in ENV_OVERRIDES.items():
        if env.get(var):
            overrides[section][key] = (env[var], f"{section}.{key} (from {var})")

    server = _server(root.sub("server"))
    request = _request(root.sub("request"))
    ops = _ops(root.sub("ops"))
    upstream = _upstream(root.sub("upstream"), overrides["upstream"])
    store = _store(root.sub("store"), overrides["store"])
    identity = _identity(root.sub("identity"))
    rate_limits = tuple(_policy(t) for t in root.table_list("rate_limit"))
    concurrency_limits = tuple(_concurrency_limit(t) for t in root.table_list("concurrency_limit"))
    priorities = tuple(_priority(t) for t in root.table_list("priority"))
    shedding = _shedding(root.sub("shedding"), priorities)
    reserved = 0.0
    for i, cls in enumerate(priorities):
        reserved += cls.reserve
        if reserved >= 1:
            reader.problem(f"priority[{i}].reserve", "the reserves add up to 1 or more: the classes "
                           "after this one would get no share of the fleet budget")
            break
    idempotency = _idempotency(root.sub("idempotency"))
    for i, policy in enumerate(rate_limits):
        source = policy.plan if isinstance(policy.plan, str) else ""
        if source.startswith("jwt:") and identity.jwt is None and not reader.problems:
            reader.problem(f"rate_limit[{i}].plan", f"{show(source)} needs [identity.jwt]: the algorithms "
                           "and the key that verify the token")
        elif source.startswith("header:") and not identity.trusted_proxies:
            reader.problem(f"rate_limit[{i}].plan", f"{show(source)} is believed only from "
                           "identity.trusted_proxies, and there are none: a client could pick its own plan")
    errors_t = root.sub("errors")
    errors = ErrorsConfig(format=errors_t.choice("format", ErrorsConfig().format, _ERROR_FORMAT))
    errors_t.finish()
    response_t = root.sub("response")
    response = ResponseConfig(rate_limit_headers=response_t.choice(
        "rate_limit_headers", ResponseConfig().rate_limit_headers, _RATE_LIMIT_HEADERS))
    response_t.finish()
    named_sections: tuple[tuple[str, tuple[Any, ...]], ...] = (
        ("rate_limit", rate_limits), ("concurrency_limit", concurrency_limits), ("priority", priorities))
    for section, named in named_sections:
        names = [p.name for p in named]
        for i, name in enumerate(names):
            if name in names[:i]:
                reader.problem(f"{section}[{i}].name", f'duplicate policy name "{name}"')
    root.finish()
    if reader.problems:
        raise ConfigError(reader.problems)
    return Config(
        server=server,
        request=request,
        ops=ops,
        upstream=upstream,
        store=store,
        identity=identity,
        rate_limits=rate_limits,
        concurrency_limits=concurrency_limits,
        priorities=priorities,
        shedding=shedding,
        idempotency=idempotency,
        errors=errors,
        response=response,
    )


def _server(t: Table) -> ServerConfig:
    d = ServerConfig()
    cfg = ServerConfig(
        host=t.string("host", d.host),
        port=t.integer("port", d.port, low=0, high=65535),
        workers=t.integer("workers", d.workers, low=1, high=512),
        header_timeout_s=t.duration("header_timeout", d.header_timeout_s, low=0.1, high=600.0),
        max_connections=t.integer("max_connections", d.max_connections, low=1, high=1_000_000),
    )
    t.finish()
    return cfg


def _request(t: Table) -> RequestConfig:
    d = RequestConfig()
    cfg = RequestConfig(
        path_normalization=t.choice("path_normalization", d.path_normalization, _PATH_NORMALIZATION),
        limit_preflights=t.boolean("limit_preflights", d.limit_preflights),
    )
    t.finish()
    return cfg


def _ops(t: Table) -> OpsConfig:
    d = OpsConfig()
    prefix = t.string("prefix", d.prefix)
    if prefix != d.prefix and not _OPS_PREFIX.fullmatch(prefix):
        t.problem("prefix", f'expected a path like "/_gateway" (segments of A-Z a-z 0-9 . _ ~ -, no '
                  f"trailing slash, not /), got {show(prefix)}")
        prefix = d.prefix
    cfg = OpsConfig(
        enabled=t.boolean("enabled", d.enabled),
        prefix=prefix,
        allow=t.networks("allow", d.allow),
        metrics_allow=t.networks("metrics_allow", d.metrics_allow),
    )
    t.finish()
    return cfg


def _upstream(t: Table, overrides: dict[str, tuple[str, str]]) -> UpstreamConfig:
    d = UpstreamConfig()
    cfg = UpstreamConfig(
        url=t.url("url", d.url, schemes=("http", "https"), override=overrides.get("url")),
        connect_timeout_s=t.duration("connect_timeout", d.connect_timeout_s, low=0.001, high=3600.0),
        timeout_s=t.duration("timeout", d.timeout_s, low=0.001, high=3600.0),
    )
    t.finish()
    return cfg


def _store(t: Table, overrides: dict[str, tuple[str, str]]) -> StoreConfig:
    d = StoreConfig()
    problems_before = t.problem_count()
    schemes = ("memory", "redis", "rediss", "unix")
    url = t.url("url", d.url, schemes=schemes, override=overrides.get("url"))
    url_ok = t.problem_count() == problems_before
    pair_before = t.problem_count()
    sentinels = t.addresses("sentinels", d.sentinels)
    service_name = t.string("service_name", d.service_name)
    pair_ok = t.problem_count() == pair_before
    cfg = StoreConfig(
        url=url,
        cluster=t.boolean("cluster", d.cluster),
        sentinels=sentinels,
        service_name=service_name,
        timeout_s=t.duration("timeout", d.timeout_s, low=0.001, high=60.0),
        key_prefix=t.key_prefix("key_prefix", d.key_prefix),
        max_connections=t.integer("max_connections", d.max_connections, low=1, high=10_000),
        breaker_failures=t.integer("breaker_failures", d.breaker_failures, low=1, high=10_000),
        breaker_cooldown_s=t.duration("breaker_cooldown", d.breaker_cooldown_s, low=0.001, high=3600.0),
    )
    # a rejected value has its own problem line; the default standing in for it is not the user's
    local = url.split(":", 1)[0] in ("memory", "unix")
    if url_ok and cfg.cluster and local:
        t.problem("cluster", f"a cluster needs a redis:// or rediss:// url, got {url!r}")
    if sentinels and cfg.cluster:
        t.problem("sentinels", "not with cluster = true: a Redis Cluster fails over by itself")
    elif sentinels and url_ok and local:
        t.problem("sentinels", "need a redis:// or rediss:// store.url (for its scheme, credentials "
                  f"and database; its host is not used), got {url!r}")
    if pair_ok and sentinels and not service_name:
        t.problem("service_name", "required with sentinels: the name they monitor the master under")
    elif pair_ok and service_name and not sentinels:
        t.problem("service_name", "only used with sentinels: set store.sentinels too")
    t.finish()
    return cfg


def _identity(t: Table) -> IdentityConfig:
    d = IdentityConfig()
    sources = t.identity_sources("sources", d.sources)
    trusted = t.networks("trusted_proxies", d.trusted_proxies)
    from gateway.bearer import jwt_available

    jwt_given = t.has("jwt")
    jwt = None
    if jwt_given and not jwt_available():
        t.problem("jwt", "verifying JWTs needs PyJWT: pip install 'gateway[jwt]'")
    elif jwt_given:
        jwt = _jwt(t.sub("jwt"))
    for i, source in enumerate(sources):
        if isinstance(source, str) and source.startswith("jwt:") and jwt is None and not jwt_given:
            t.problem(f"sources[{i}]", f"{show(source)} needs [identity.jwt]: the algorithms and the key "
                      "(key, key_file or jwks_file) that verify the token")
    t.finish()
    return IdentityConfig(sources=sources, trusted_proxies=trusted, jwt=jwt)


def _jwt(t: Table) -> JwtConfig | None:
    """``[identity.jwt]``: pinned algorithms and one key, checked now (a bad key is a config error,
    not a request that silently has no identity)."""
    from gateway.bearer import ALGORITHM_FAMILIES, load_keys

    d = JwtConfig(algorithms=())
    before = t.problem_count()
    algorithms = t.algorithms("algorithms", ALGORITHM_FAMILIES)
    key_text = t.string("key", "") or None
    key_file = t.string("key_file", "") or None
    jwks_file = t.string("jwks_file", "") or None
    cfg = JwtConfig(
        algorithms=algorithms,
        audience=t.strings("audience"),
        issuer=t.string("issuer", d.issuer),
        leeway_s=t.duration("leeway", d.leeway_s, low=0.0, high=300.0),
        require_exp=t.boolean("require_exp", d.require_exp),
    )
    given = [k for k, v in (("key", key_text), ("key_file", key_file), ("jwks_file", jwks_file)) if v]
    if len(given) != 1:
        t.problem("key", "set exactly one of key, key_file or jwks_file" + (f" (got {', '.join(given)})"
                                                                                  if given else ""))
    if t.problem_count() != before or len(given) != 1:
        t.finish()
        return None
    name = given[0]
    try:
        if key_text is not None:
            key: bytes | None = key_text.encode()
            jwks = None
        else:
            path = key_file or jwks_file
            assert path is not None
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
            key, jwks = (raw.rstrip(b"\r\n"), None) if key_file else (None, raw.decode("utf-8", "replace"))
        load_keys(algorithms, key=key, jwks=jwks)
    except OSError as exc:
        t.problem(name, f"cannot read {show(key_file or jwks_file)}: {exc.strerror or exc}")
        t.finish()
        return None
    except ValueError as exc:
        t.problem(name, str(exc))
        t.finish()
        return None
    t.finish()
    return JwtConfig(algorithms=cfg.algorithms, key=key, jwks=jwks, audience=cfg.audience, issuer=cfg.issuer,
                     leeway_s=cfg.leeway_s, require_exp=cfg.require_exp)


def _policy(t: Table) -> RateLimitPolicy:
    d = RateLimitPolicy()
    limit = t.integer("limit", d.limit, low=1, high=_EXACT_LIMIT)
    period_s = t.duration("period", d.period_ms / 1000, low=0.001, high=366 * 86_400.0)
    period_ms = max(1, round(period_s * 1000))
    burst = t.integer("burst", limit, low=1, high=_EXACT_LIMIT)
    cost = t.integer("cost", d.cost, low=1, high=_EXACT_LIMIT)
    if cost > burst:
        t.problem("cost", f"must not exceed burst ({burst}), or no request could ever pass; got {cost}")
    if burst * (period_ms // math.gcd(limit, period_ms)) >= _EXACT_LIMIT:
        t.problem("burst", "too large for this limit and period: burst x period / gcd(limit, "
                  "period in ms) must stay below 2^50 for exact token arithmetic")
    before = t.problem_count()
    plan = t.plan_source("plan")
    plans = _plans(t, limit=limit, period_ms=period_ms, cost=cost) if t.has("plans") else ()
    if t.problem_count() != before:
        pass  # a bad plan or plans has its own line
    elif plan is not None and not plans:
        t.problem("plan", "names where the client's plan is read, but there is no plans table giving "
                  "each plan's numbers (plans = { free = { limit = 10 }, ... })")
    elif plans and plan is None:
        t.problem("plans", "need plan: where the client's plan is read (\"jwt:CLAIM\", \"header:NAME\" "
                  "from identity.trusted_proxies, or in-process a callable)")
    policy = RateLimitPolicy(
        name=t.policy_name("name", d.name),
        limit=limit,
        period_ms=period_ms,
        burst=burst,
        cost=cost,
        key=t.policy_key("key", d.key),
        paths=t.paths("paths", d.paths, empty_ok=False),
        methods=t.methods("methods", d.methods),
        exempt_paths=t.paths("exempt_paths", d.exempt_paths, empty_ok=True),
        exempt_methods=t.methods("exempt_methods", d.exempt_methods),
        on_store_error=t.choice("on_store_error", d.on_store_error, _ON_STORE_ERROR),
        mode=t.choice("mode", d.mode, _POLICY_MODE),
        plan=plan,
        plans=plans,
    )
    t.finish()
    return policy


def _plans(t: Table, *, limit: int, period_ms: int, cost: int) -> tuple[PlanLimits, ...]:
    """``plans = { free = { limit = 10 }, pro = { limit = 1000, burst = 2000 } }``: per plan,
    ``limit``, ``burst`` (the plan's limit unless given) and ``cost`` (the policy's unless given),
    each checked as the policy's own are."""
    table = t.sub("plans")
    before = t.problem_count()
    out: list[PlanLimits] = []
    for name in table.given_keys():
        if not _PLAN_NAME.fullmatch(name):
            table.problem(name, "a plan name is 1-64 characters of A-Z a-z 0-9 . _ -")
            continue
        entry = table.sub(name)
        plan_limit = entry.integer("limit", limit, low=1, high=_EXACT_LIMIT)
        burst = entry.integer("burst", plan_limit, low=1, high=_EXACT_LIMIT)
        plan_cost = entry.integer("cost", cost, low=1, high=_EXACT_LIMIT)
        if plan_cost > burst:
            entry.problem("cost", f"must not exceed burst ({burst}), or no request could ever pass; "
                          f"got {plan_cost}")
        if burst * (period_ms // math.gcd(plan_limit, period_ms)) >= _EXACT_LIMIT:
            entry.problem("burst", "too large for this limit and period (below 2^50, as the policy's)")
        entry.finish()
        out.append(PlanLimits(name=name, limit=plan_limit, burst=burst, cost=plan_cost))
    if not out and t.problem_count() == before:
        t.problem("plans", "expected at least one plan, e.g. { pro = { limit = 1000 } }")
    return tuple(out)


def _concurrency_limit(t: Table) -> ConcurrencyLimit:
    d = ConcurrencyLimit()
    lease_s = t.duration("lease", d.lease_ms / 1000, low=0.1, high=86_400.0)  # renewed every third of it
    limit = ConcurrencyLimit(
        name=t.policy_name("name", d.name),
        limit=t.integer("limit", d.limit, low=1, high=1_000_000),
        key=t.policy_key("key", d.key),
        paths=t.paths("paths", d.paths, empty_ok=False),
        methods=t.methods("methods", d.methods),
        exempt_paths=t.paths("exempt_paths", d.exempt_paths, empty_ok=True),
        exempt_methods=t.methods("exempt_methods", d.exempt_methods),
        lease_ms=max(1, round(lease_s * 1000)),
        on_store_error=t.choice("on_store_error", d.on_store_error, _ON_STORE_ERROR),
        mode=t.choice("mode", d.mode, _LIMIT_MODES),
    )
    t.finish()
    return limit


def _priority(t: Table) -> PriorityClass:
    cls = PriorityClass(
        name=t.policy_name("name", ""),
        paths=t.paths("paths", ("/",), empty_ok=False),
        methods=t.methods("methods", frozenset()),
        header=t.header_match("header"),
        reserve=t.fraction("reserve", 0.0),
    )
    if not cls.name:
        t.problem("name", "required: the class's name, shown in metrics and problems")
    t.finish()
    return cls


def _shedding(t: Table, priorities: tuple[PriorityClass, ...]) -> SheddingConfig:
    d = SheddingConfig()
    names = [p.name for p in priorities]
    default_class = t.policy_name("default_class", d.default_class)
    if default_class != d.default_class and default_class not in names:
        t.problem("default_class", f'names no [[priority]] class: "{default_class}"')
    fleet_t, local_t = t.sub("fleet"), t.sub("local")
    fd, ld = FleetShedding(), LocalShedding()
    fleet = FleetShedding(
        enabled=fleet_t.boolean("enabled", fd.enabled),
        limit=fleet_t.integer("limit", fd.limit, low=1, high=10_000_000),
        lease_ms=max(1, round(fleet_t.duration("lease", fd.lease_ms / 1000, low=0.1, high=86_400.0) * 1000)),
        mode=fleet_t.choice("mode", fd.mode, _LIMIT_MODES),
        on_store_error=fleet_t.choice("on_store_error", fd.on_store_error, _ON_STORE_ERROR),
    )
    fleet_t.finish()
    local = LocalShedding(
        enabled=local_t.boolean("enabled", ld.enabled),
        max_in_flight=local_t.integer("max_in_flight", ld.max_in_flight, low=1, high=1_000_000),
        max_loop_lag_s=local_t.duration("max_loop_lag", ld.max_loop_lag_s, low=0.005, high=60.0),
        mode=local_t.choice("mode", ld.mode, _LIMIT_MODES),
    )
    local_t.finish()
    cfg = SheddingConfig(default_class=default_class, fleet=fleet, local=local)
    t.finish()
    return cfg


def _idempotency(t: Table) -> IdempotencyConfig:
    d = IdempotencyConfig()
    cfg = IdempotencyConfig(
        header=t.header_name("header", d.header),
        methods=t.methods("methods", d.methods),
        ttl_s=t.duration("ttl", d.ttl_s, low=1.0),  # a record gone sooner cannot dedupe a retry
        lock_ttl_s=t.duration("lock_ttl", d.lock_ttl_s, low=0.1),  # renewed every third of it
        on_lost_claim=t.choice("on_lost_claim", d.on_lost_claim, _ON_LOST_CLAIM),
        completion_timeout_s=t.duration("completion_timeout", d.completion_timeout_s, low=0.1, high=600.0),
        required_paths=t.paths("required_paths", d.required_paths, empty_ok=True),
        max_body_bytes=t.integer("max_body_bytes", d.max_body_bytes, low=0, high=2**31),
        on_store_error=t.choice("on_store_error", d.on_store_error, _ON_STORE_ERROR),
        fingerprint=t.choice("fingerprint", d.fingerprint, _FINGERPRINT),
        release_statuses=t.statuses("release_statuses", d.release_statuses, low=400, high=599,
                                    why="a 1xx-3xx response means the request was carried out"),
        on_in_flight=t.choice("on_in_flight", d.on_in_flight, _ON_IN_FLIGHT),
        wait_timeout_s=t.duration("wait_timeout", d.wait_timeout_s, low=0.01, high=600.0),
    )
    t.finish()
    return cfg
