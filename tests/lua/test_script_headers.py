"""Every script documents its contract and keeps to what both Redis and fakeredis run."""

from __future__ import annotations

import re

import pytest

from gateway.store.scripts import read_script, script_names

FORBIDDEN = ("cmsgpack", "bit.", "struct.", "redis.sha1hex", "redis.replicate_commands", "KEYS[#")


@pytest.mark.parametrize("name", script_names())
class TestScriptHeader:
    def test_header_documents_keys_argv_returns_ttl(self, name: str) -> None:
        """The opening block names the decision and documents KEYS, ARGV, Returns and TTL."""
        source = read_script(name)
        assert source.startswith(f"--[[\n{name}: "), "header must open with the script's name"
        header = source.split("]]", 1)[0]
        for section in ("KEYS[", "ARGV[", "Returns", "TTL"):
            assert section in header, f"{name}.lua header lacks {section}"

    def test_only_lua_51_and_redis_calls_both_runtimes_have(self, name: str) -> None:
        """No module fakeredis lacks, and no key built inside the script (cluster safety)."""
        body = read_script(name).split("]]", 1)[1]
        for word in FORBIDDEN:
            assert word not in body, f"{name}.lua uses {word}"
        # every key a script touches is passed in KEYS: redis.call's key argument is KEYS[...]
        for call in re.findall(r"redis\.call\('(\w+)',\s*([^,)]+)", body):
            command, key = call
            if command.upper() not in ("TIME",):
                assert key.strip().startswith("KEYS["), f"{name}.lua: {command} on {key}"


def test_ratelimit_take_is_present() -> None:
    """The scripts folder holds the token-bucket script the rate limiter needs."""
    assert "ratelimit_take" in script_names()
