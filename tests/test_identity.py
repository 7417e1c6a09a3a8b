"""Who is asking: the identity sources chain, key hashing, header policies and X-Forwarded-For.

CONTRACT.md section 5 "Rate limits": every key value is hashed before it becomes a store key,
``X-Forwarded-For`` is believed only from ``trusted_proxies``, and a ``header:NAME`` policy puts
all requests lacking the header into one shared bucket. research/semantics.md D13: only when the
direct peer is trusted, walk XFF right to left skipping trusted hops; the first untrusted entry is
the client, with no leftward fallback.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import IdentityConfig, load_config
from gateway.identity import GLOBAL_TAG, IdentityResolver, tag

XFF = b"x-forwarded-for"
API_KEY = b"x-api-key"
_NO_CLIENT: Any = object()
_HEX32 = re.compile(r"[0-9a-f]{32}")


def make_scope(
    *headers: tuple[bytes, bytes], client: Any = ("1.2.3.4", 5555)
) -> dict[str, Any]:
    """A minimal ASGI HTTP scope; ``client=None`` models a server that knows no peer."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": list(headers),
    }
    if client is not _NO_CLIENT:
        scope["client"] = client
    return scope


def resolver(
    keys: Iterable[str] = ("identity",),
    *,
    sources: Iterable[str] = ("header:x-api-key", "ip"),
    trusted: Iterable[str] = (),
) -> IdentityResolver:
    config = IdentityConfig(sources=tuple(sources), trusted_proxies=tuple(trusted))
    return IdentityResolver(config, tuple(keys))


def ip_tag(addr: str) -> str:
    """The tag a direct request from ``addr`` gets for an ``ip`` policy."""
    return tag(b"ip:" + addr.encode())


def direct_ip_tag(addr: str) -> str:
    """The ``ip`` tag of a request straight from ``addr``, computed through the resolver."""
    return resolver(("ip",)).tags(make_scope(client=(addr, 1234)))["ip"]


class TestSourcesChain:
    def test_header_identifies_client_when_present(self) -> None:
        """A request carrying x-api-key is identified by the key, not by its IP."""
        r = resolver()
        with_key = r.tags(make_scope((API_KEY, b"abc"), client=("1.2.3.4", 1)))["identity"]
        assert with_key != ip_tag("1.2.3.4")
        assert with_key == resolver(("header:x-api-key",)).tags(
            make_scope((API_KEY, b"abc"))
        )["header:x-api-key"]

    def test_falls_back_to_ip_without_header(self) -> None:
        """A request without the header is identified by its client IP."""
        r = resolver()
        assert r.tags(make_scope(client=("1.2.3.4", 1)))["identity"] == ip_tag("1.2.3.4")
        assert r.tags(make_scope(client=("5.6.7.8", 1)))["identity"] == ip_tag("5.6.7.8")

    def test_different_keys_give_different_tags(self) -> None:
        """Two different API keys from the same IP are two identities."""
        r = resolver()
        a = r.tags(make_scope((API_KEY, b"key-a")))["identity"]
        b = r.tags(make_scope((API_KEY, b"key-b")))["identity"]
        assert a != b

    def test_same_key_from_two_ips_is_one_identity(self) -> None:
        """The same API key from two IPs gives the same tag."""
        r = resolver()
        a = r.tags(make_scope((API_KEY, b"abc"), client=("1.2.3.4", 1)))["identity"]
        b = r.tags(make_scope((API_KEY, b"abc"), client=("9.9.9.9", 2)))["identity"]
        assert a == b

    def test_empty_header_counts_as_absent(self) -> None:
        """An empty x-api-key falls through to the IP source."""
        r = resolver()
        got = r.tags(make_scope((API_KEY, b""), client=("1.2.3.4", 1)))["identity"]
        assert got == ip_tag("1.2.3.4")

    def test_no_source_yields_shared_anonymous_tag(self) -> None:
        """Without the header and without a client address everyone shares one anonymous tag."""
        r = resolver()
        a = r.tags(make_scope(client=None))["identity"]
        b = r.tags(make_scope((b"user-agent", b"x"), client=_NO_CLIENT))["identity"]
        assert a == b
        assert _HEX32.fullmatch(a)
        assert a != r.tags(make_scope(client=("1.2.3.4", 1)))["identity"]
        assert a != r.tags(make_scope((API_KEY, b"anonymous")))["identity"]

    def test_header_only_sources_make_unkeyed_requests_anonymous(self) -> None:
        """With only a header source, requests without it are one identity whatever their IP."""
        r = resolver(sources=("header:x-api-key",))
        a = r.tags(make_scope(client=("1.2.3.4", 1)))["identity"]
        b = r.tags(make_scope(client=("5.6.7.8", 1)))["identity"]
        assert a == b == r.tags(make_scope(client=None))["identity"]
        assert a != ip_tag("1.2.3.4")

    def test_source_order_decides(self) -> None:
        """With sources ["ip", "header:x-api-key"] the IP wins even when the header is present."""
        r = resolver(sources=("ip", "header:x-api-key"))
        got = r.tags(make_scope((API_KEY, b"abc"), client=("1.2.3.4", 1)))["identity"]
        assert got == ip_tag("1.2.3.4")
        anonymous_ip = r.tags(make_scope((API_KEY, b"abc"), client=None))["identity"]
        assert anonymous_ip == resolver(("header:x-api-key",)).tags(
            make_scope((API_KEY, b"abc"))
        )["header:x-api-key"]

    def test_first_header_source_with_a_value_wins(self) -> None:
        """Among several header sources the first one present identifies the client."""
        r = resolver(sources=("header:authorization", "header:x-api-key", "ip"))
        both = r.tags(make_scope((API_KEY, b"k"), (b"authorization", b"Bearer t")))["identity"]
        only_auth = r.tags(make_scope((b"authorization", b"Bearer t")))["identity"]
        only_key = r.tags(make_scope((API_KEY, b"k")))["identity"]
        assert both == only_auth
        assert both != only_key

    def test_load_config_lowercases_header_sources(self) -> None:
        """A source written "header:X-API-Key" in the config matches the lowercase ASGI header."""
        config = load_config({"identity": {"sources": ["header:X-API-Key", "ip"]}})
        r = IdentityResolver(config.identity, ("identity",))
        got = r.tags(make_scope((API_KEY, b"abc"), client=("1.2.3.4", 1)))["identity"]
        assert got != ip_tag("1.2.3.4")
        assert got == resolver().tags(make_scope((API_KEY, b"abc")))["identity"]

    def test_typed_config_with_mixed_case_header_source_matches(self) -> None:
        """A typed IdentityConfig naming "header:X-API-Key" still identifies by that header."""
        r = resolver(sources=("header:X-API-Key", "ip"))
        got = r.tags(make_scope((API_KEY, b"abc"), client=("1.2.3.4", 1)))["identity"]
        assert got != ip_tag("1.2.3.4")


class TestHashing:
    SECRET = "sk_live_51HxQSecretValue"
    ADDR = "203.0.113.77"

    def all_tags(self) -> dict[str, str]:
        r = resolver(("identity", "ip", "header:x-api-key", "header:authorization", "global"))
        scope = make_scope(
            (API_KEY, self.SECRET.encode()),
            (b"authorization", b"Bearer " + self.SECRET.encode()),
            client=(self.ADDR, 4444),
        )
        return r.tags(scope)

    def test_tag_is_deterministic_32_hex(self) -> None:
        """tag() is a pure function giving 32 lowercase hex characters, different per input."""
        assert tag(b"ip:1.2.3.4") == tag(b"ip:1.2.3.4")
        assert _HEX32.fullmatch(tag(b"ip:1.2.3.4"))
        assert _HEX32.fullmatch(tag(b""))
        assert tag(b"ip:1.2.3.4") != tag(b"ip:1.2.3.5")

    def test_resolver_is_deterministic(self) -> None:
        """Two resolvers on the same config give the same tags for the same request."""
        assert self.all_tags() == self.all_tags()

    def test_no_tag_contains_the_secret_or_the_address(self) -> None:
        """No tag holds the API key or the client IP in clear, lowercased, hex or numeric form."""
        packed = ipaddress.ip_address(self.ADDR).packed
        forms = {
            self.SECRET,
            self.SECRET.lower(),
            self.SECRET.encode().hex(),
            self.SECRET[:12],
            self.ADDR,
            self.ADDR.replace(".", ""),
            packed.hex(),
            str(int(ipaddress.ip_address(self.ADDR))),
        }
        tags = self.all_tags()
        for key, value in tags.items():
            if key == "global":
                continue
            assert _HEX32.fullmatch(value), (key, value)
            for form in forms:
                assert form not in value, (key, form)

    def test_global_policy_gets_constant_tag(self) -> None:
        """A ``global`` policy is the one GLOBAL_TAG for every request, keyed or not."""
        r = resolver(("global", "identity"))
        scopes = [
            make_scope((API_KEY, b"a"), client=("1.2.3.4", 1)),
            make_scope(client=("5.6.7.8", 1)),
            make_scope(client=None),
        ]
        assert {r.tags(s)["global"] for s in scopes} == {GLOBAL_TAG}
        assert self.all_tags()["global"] == GLOBAL_TAG


class TestHeaderPolicies:
    def test_requests_without_header_share_one_bucket(self) -> None:
        """Requests lacking the header share one tag whatever their IP or other headers."""
        r = resolver(("header:x-tenant",))
        tags = {
            r.tags(make_scope(client=("1.2.3.4", 1)))["header:x-tenant"],
            r.tags(make_scope((API_KEY, b"k"), client=("5.6.7.8", 1)))["header:x-tenant"],
            r.tags(make_scope(client=None))["header:x-tenant"],
            r.tags(make_scope((b"x-tenant", b"")))["header:x-tenant"],
        }
        assert len(tags) == 1
        assert _HEX32.fullmatch(tags.pop())

    def test_different_values_differ_same_values_match(self) -> None:
        """Different header values are different buckets; the same value from two IPs is one."""
        r = resolver(("header:x-tenant",))
        a1 = r.tags(make_scope((b"x-tenant", b"acme"), client=("1.2.3.4", 1)))
        a2 = r.tags(make_scope((b"x-tenant", b"acme"), client=("9.9.9.9", 1)))
        b = r.tags(make_scope((b"x-tenant", b"globex")))
        missing = r.tags(make_scope())
        assert a1 == a2
        assert a1 != b
        assert a1 != missing

    def test_header_name_is_part_of_the_tag(self) -> None:
        """The same value under two header policies gives two different tags."""
        r = resolver(("header:x-tenant", "header:x-api-key"))
        got = r.tags(make_scope((b"x-tenant", b"v"), (API_KEY, b"v")))
        assert got["header:x-tenant"] != got["header:x-api-key"]

    def test_header_identity_shares_tag_with_header_policy(self) -> None:
        """An identity from header:x-api-key and a header:x-api-key policy tag the same bucket."""
        r = resolver(("identity", "header:x-api-key", "ip"))
        got = r.tags(make_scope((API_KEY, b"abc"), client=("1.2.3.4", 1)))
        assert got["identity"] == got["header:x-api-key"]
        assert got["ip"] != got["identity"]
        assert got["ip"] == ip_tag("1.2.3.4")

    def test_ip_identity_shares_tag_with_ip_policy(self) -> None:
        """An identity that came from the IP source tags the same bucket as an ip policy."""
        r = resolver(("identity", "ip"))
        got = r.tags(make_scope(client=("1.2.3.4", 1)))
        assert got["identity"] == got["ip"] == ip_tag("1.2.3.4")

    def test_missing_header_bucket_is_not_the_anonymous_identity(self) -> None:
        """The shared missing-header bucket is distinct from the anonymous identity and ip tags."""
        r = resolver(("identity", "header:x-api-key", "ip"))
        got = r.tags(make_scope(client=None))
        assert len(set(got.values())) == 3


class TestForwardedFor:
    TRUSTED = ("10.0.0.0/8",)
    PROXY = ("10.0.0.5", 40000)

    def via_proxy(
        self,
        *xff: bytes,
        trusted: Iterable[str] = TRUSTED,
        peer: tuple[str, int] = PROXY,
        keys: Iterable[str] = ("ip",),
    ) -> dict[str, str]:
        r = resolver(keys, trusted=trusted)
        return r.tags(make_scope(*((XFF, v) for v in xff), client=peer))

    def test_ignored_without_trusted_proxies(self) -> None:
        """With no trusted_proxies a spoofed X-Forwarded-For changes nothing."""
        r = resolver(("ip", "identity"))
        plain = r.tags(make_scope(client=("1.2.3.4", 1)))
        spoofed = r.tags(make_scope((XFF, b"6.6.6.6"), client=("1.2.3.4", 1)))
        assert spoofed == plain
        assert spoofed["ip"] == ip_tag("1.2.3.4")
        from_private = r.tags(make_scope((XFF, b"6.6.6.6"), client=("10.0.0.5", 1)))
        assert from_private["ip"] == ip_tag("10.0.0.5")

    def test_trusted_proxy_gives_rightmost_untrusted(self) -> None:
        """Through one trusted proxy, ``6.6.6.6, 1.2.3.4`` is the client 1.2.3.4."""
        got = self.via_proxy(b"6.6.6.6, 1.2.3.4")["ip"]
        assert got == direct_ip_tag("1.2.3.4")
        assert got == ip_tag("1.2.3.4")
        assert got != ip_tag("6.6.6.6")

    def test_identity_uses_the_resolved_client(self) -> None:
        """An ip-sourced identity behind a trusted proxy is the forwarded client, not the proxy."""
        got = self.via_proxy(b"6.6.6.6, 1.2.3.4", keys=("identity",))["identity"]
        assert got == resolver().tags(make_scope(client=("1.2.3.4", 1)))["identity"]

    def test_several_trusted_hops_are_skipped(self) -> None:
        """Trusted hops on the right are skipped to reach the first untrusted entry."""
        got = self.via_proxy(b"6.6.6.6, 1.2.3.4, 10.1.1.1, 10.2.2.2")["ip"]
        assert got == ip_tag("1.2.3.4")

    @pytest.mark.parametrize(
        "prefix",
        [
            b"",
            b"6.6.6.6, ",
            b"10.9.9.9, ",
            b"1.1.1.1, 10.0.0.1, 10.0.0.2, ",
            b"garbage, ",
            b", , ",
            b"::ffff:10.0.0.1, ",
        ],
    )
    def test_prepended_entries_cannot_change_result(self, prefix: bytes) -> None:
        """Whatever a client prepends, the hops our proxies appended decide the client."""
        got = self.via_proxy(prefix + b"1.2.3.4, 10.1.1.1")["ip"]
        assert got == ip_tag("1.2.3.4")

    def test_victim_address_cannot_be_claimed(self) -> None:
        """An attacker at 6.6.6.6 writing a victim's address in XFF is still 6.6.6.6."""
        got = self.via_proxy(b"1.2.3.4, 6.6.6.6")["ip"]
        assert got == ip_tag("6.6.6.6")
        assert got != ip_tag("1.2.3.4")

    def test_untrusted_peer_xff_ignored(self) -> None:
        """A direct peer outside trusted_proxies has its XFF ignored: the peer is the client."""
        got = self.via_proxy(b"1.2.3.4", b"10.0.0.7", peer=("8.8.8.8", 1))["ip"]
        assert got == ip_tag("8.8.8.8")

    def test_trusted_peer_without_xff_is_the_client(self) -> None:
        """A trusted proxy that forwards no XFF is itself the client."""
        assert self.via_proxy()["ip"] == ip_tag("10.0.0.5")
        assert self.via_proxy(b"")["ip"] == ip_tag("10.0.0.5")
        assert self.via_proxy(b" , ")["ip"] == ip_tag("10.0.0.5")

    def test_multiple_header_lines_form_one_list_in_order(self) -> None:
        """Several X-Forwarded-For lines are one list, first line leftmost."""
        assert self.via_proxy(b"6.6.6.6", b"1.2.3.4, 10.1.1.1")["ip"] == ip_tag("1.2.3.4")
        assert self.via_proxy(b"1.2.3.4", b"5.6.7.8")["ip"] == ip_tag("5.6.7.8")
        assert self.via_proxy(b"5.6.7.8", b"1.2.3.4")["ip"] == ip_tag("1.2.3.4")
        assert self.via_proxy(b"1.2.3.4", b"10.1.1.1", b"10.2.2.2")["ip"] == ip_tag("1.2.3.4")

    @pytest.mark.parametrize(
        ("entry", "bare"),
        [
            (b"1.2.3.4:5678", "1.2.3.4"),
            (b"::ffff:1.2.3.4", "1.2.3.4"),
            (b"[::ffff:1.2.3.4]:80", "1.2.3.4"),
            (b"[2001:db8::1]:443", "2001:db8::1"),
            (b"[2001:db8::1]", "2001:db8::1"),
            (b"2001:DB8:0:0::1", "2001:db8::1"),
            (b"  1.2.3.4  ", "1.2.3.4"),
        ],
    )
    def test_entries_normalise_to_the_bare_address(self, entry: bytes, bare: str) -> None:
        """Ports, brackets, IPv4-mapped IPv6 and spelling variants are the same client."""
        got = self.via_proxy(b"6.6.6.6, " + entry + b", 10.1.1.1")["ip"]
        assert got == ip_tag(bare)
        assert got == direct_ip_tag(bare)

    def test_trusted_hops_with_ports_are_skipped(self) -> None:
        """A trusted hop written with a port or IPv4-mapped is still recognised as trusted."""
        got = self.via_proxy(b"1.2.3.4, 10.1.1.1:8080, ::ffff:10.2.2.2, [::ffff:10.3.3.3]:1")["ip"]
        assert got == ip_tag("1.2.3.4")

    def test_mapped_trusted_peer_is_trusted(self) -> None:
        """A direct peer reported as ::ffff:10.0.0.5 is recognised as the trusted 10.0.0.5."""
        got = self.via_proxy(b"1.2.3.4", peer=("::ffff:10.0.0.5", 1))["ip"]
        assert got == ip_tag("1.2.3.4")

    def test_all_trusted_gives_leftmost(self) -> None:
        """When every hop is trusted, the leftmost is the client."""
        got = self.via_proxy(b"10.3.3.3, 10.2.2.2, 10.1.1.1")["ip"]
        assert got == ip_tag("10.3.3.3")
        assert self.via_proxy(b"10.3.3.3:99")["ip"] == ip_tag("10.3.3.3")

    def test_ipv6_trusted_range(self) -> None:
        """IPv6 CIDRs in trusted_proxies work for the peer and for hops."""
        got = self.via_proxy(
            b"6.6.6.6, 2001:db8::42, 2001:db8:ffff::2, [2001:db8:ffff::3]:443",
            trusted=("2001:db8:ffff::/48",),
            peer=("2001:db8:ffff::1", 1),
        )["ip"]
        assert got == ip_tag("2001:db8::42")
        untrusted_peer = self.via_proxy(
            b"1.2.3.4", trusted=("2001:db8:ffff::/48",), peer=("2001:db8:1::1", 1)
        )["ip"]
        assert untrusted_peer == ip_tag("2001:db8:1::1")

    def test_mixed_v4_v6_trusted_ranges(self) -> None:
        """Trusted ranges of both families apply to one chain."""
        got = self.via_proxy(
            b"6.6.6.6, 1.2.3.4, 2001:db8:ffff::2, 10.1.1.1",
            trusted=("10.0.0.0/8", "2001:db8:ffff::/48"),
        )["ip"]
        assert got == ip_tag("1.2.3.4")

    @pytest.mark.parametrize(
        "garbage",
        [
            b"garbage",
            b"unknown",
            b"_hidden",
            b"1.2.3",
            b"999.1.1.1",
            b"10.0.0.0/8",
            b"10.1.1.1 :80",
        ],
    )
    def test_garbage_after_trusted_hops_stops_the_walk(self, garbage: bytes) -> None:
        """A non-IP entry right after the trusted hops is the client value; the walk stops there."""
        got = self.via_proxy(b"6.6.6.6, " + garbage + b", 10.1.1.1, 10.2.2.2")["ip"]
        assert got != ip_tag("6.6.6.6")
        assert got != ip_tag("10.0.0.5")
        assert got == ip_tag(garbage.decode())

    @pytest.mark.parametrize("malformed", [b"[10.1.1.1", b"10.1.1.1:x", b"[10.1.1.1]junk"])
    def test_malformed_trusted_looking_entry_stops_the_walk(self, malformed: bytes) -> None:
        """A malformed entry that merely contains a trusted address is not a trusted hop."""
        got = self.via_proxy(b"6.6.6.6, " + malformed + b", 10.2.2.2")["ip"]
        assert got != ip_tag("6.6.6.6")

    def test_xff_not_read_unless_an_ip_is_needed(self) -> None:
        """A header-identified client is unaffected by X-Forwarded-For, trusted proxy or not."""
        r = resolver(("identity",), trusted=self.TRUSTED)
        a = r.tags(make_scope((API_KEY, b"k"), (XFF, b"1.1.1.1"), client=self.PROXY))
        b = r.tags(make_scope((API_KEY, b"k"), (XFF, b"2.2.2.2"), client=self.PROXY))
        assert a == b

    def test_mapped_direct_peer_normalises_like_xff_entries(self) -> None:
        """A direct peer ::ffff:1.2.3.4 is the same client as 1.2.3.4, as it is when forwarded."""
        assert direct_ip_tag("::ffff:1.2.3.4") == direct_ip_tag("1.2.3.4")


class RecordingScope(dict[str, Any]):
    """A scope that records which of its keys were read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


class TestOnlyWhatIsNeeded:
    def test_global_only_reads_nothing(self) -> None:
        """A ("global",) resolver returns only the global tag and reads no headers or client."""
        scope = RecordingScope(make_scope((API_KEY, b"k"), (XFF, b"1.1.1.1")))
        got = resolver(("global",), trusted=("0.0.0.0/0",)).tags(scope)
        assert got == {"global": GLOBAL_TAG}
        assert not scope.read & {"headers", "client"}

    def test_header_policy_does_not_read_client(self) -> None:
        """A header:NAME-only resolver never looks at the client address."""
        scope = RecordingScope(make_scope((b"x-tenant", b"t")))
        got = resolver(("header:x-tenant",), trusted=("0.0.0.0/0",)).tags(scope)
        assert set(got) == {"header:x-tenant"}
        assert "client" not in scope.read

    def test_header_only_identity_does_not_read_client(self) -> None:
        """An identity with only header sources never looks at the client address."""
        scope = RecordingScope(make_scope())
        resolver(("identity",), sources=("header:x-api-key",)).tags(scope)
        assert "client" not in scope.read

    def test_ip_policy_does_not_need_headers_without_trusted_proxies(self) -> None:
        """An ip-only resolver with no trusted proxies reads the client and no headers."""
        scope = RecordingScope(make_scope((XFF, b"6.6.6.6"), client=("1.2.3.4", 1)))
        got = resolver(("ip",)).tags(scope)
        assert got == {"ip": ip_tag("1.2.3.4")}
        assert "headers" not in scope.read

    def test_result_has_one_entry_per_distinct_key(self) -> None:
        """Duplicate keys collapse; the result maps exactly the keys in use."""
        keys = ("ip", "global", "ip", "header:x-a", "identity", "global")
        got = resolver(keys).tags(make_scope())
        assert list(got) == ["ip", "global", "header:x-a", "identity"]


# ----------------------------------------------------------------------- property: XFF walk


_TRUSTED_NETS = st.builds(
    lambda base, prefix: ipaddress.ip_network(f"{base}/{prefix}", strict=False),
    st.ip_addresses(v=4),
    st.integers(min_value=0, max_value=32),
)


@st.composite
def _xff_case(draw: st.DrawFn) -> tuple[ipaddress.IPv4Network, list[str], str]:
    net = draw(_TRUSTED_NETS)
    inside = st.integers(0, net.num_addresses - 1).map(lambda i: str(net.network_address + i))
    outside = st.ip_addresses(v=4).map(str)
    hops = draw(st.lists(st.one_of(inside, outside), min_size=1, max_size=8))
    peer = draw(st.one_of(inside, inside, outside))
    return net, hops, peer


_SPELLINGS = st.sampled_from(["{a}", "{a}:8080", "::ffff:{a}", "[::ffff:{a}]:1", " {a} "])


class TestForwardedForProperty:
    @given(case=_xff_case(), spellings=st.data(), lines=st.integers(1, 3))
    def test_resolved_client_is_rightmost_untrusted(
        self, case: tuple[ipaddress.IPv4Network, list[str], str], spellings: st.DataObject,
        lines: int,
    ) -> None:
        """The client is the rightmost untrusted hop, or the leftmost if all are trusted."""
        net, hops, peer = case
        written = [spellings.draw(_SPELLINGS).format(a=h) for h in hops]
        # split the list over up to ``lines`` header lines, order kept
        cut = max(1, len(written) // lines)
        chunks = [written[i:i + cut] for i in range(0, len(written), cut)]
        headers = [(XFF, ", ".join(c).encode()) for c in chunks]
        got = resolver(("ip",), trusted=(str(net),)).tags(
            make_scope(*headers, client=(peer, 1))
        )["ip"]

        if ipaddress.ip_address(peer) not in net:
            assert got == ip_tag(peer)
            return
        untrusted = [i for i, h in enumerate(hops) if ipaddress.ip_address(h) not in net]
        chosen = untrusted[-1] if untrusted else 0
        assert got == ip_tag(hops[chosen])
        assert all(ipaddress.ip_address(h) in net for h in hops[chosen + 1:])
        # nothing left of the chosen hop can be the answer unless it is the same address
        for h in hops[:chosen]:
            if h != hops[chosen]:
                assert got != ip_tag(h)


def test_remembered_tags_are_the_tags_and_stay_bounded() -> None:
    """A resolver remembers the tags of recent key values (no hash per request), each the very tag
    of its value, and never more than TAGS_KEPT of them, however many clients come."""
    r = resolver(("identity", "ip"))
    r._tags.limit = 4
    for round_ in range(2):
        for i in range(10):
            key = b"key-%d" % i
            got = r.tags(make_scope((API_KEY, key), client=(f"10.0.0.{i}", 1)))
            assert got == {"identity": tag(b"h:x-api-key:" + key), "ip": ip_tag(f"10.0.0.{i}")}, round_
            assert len(r._tags) <= 4
