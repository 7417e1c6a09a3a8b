"""The ``gateway`` command: ``check``, bad command lines, and ``demo`` really serving.

Checks CONTRACT.md §2 ("Commands"): exit 0 for a valid config, exit 2 with one line per problem
naming the key otherwise, exit 2 and one line (no traceback) for a bad command line; ``python -m
gateway`` is the same as the ``gateway`` console script. Every subprocess runs on loopback, with
the ``GATEWAY_*`` overrides removed from its environment, and is stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import ConfigError, load_config
from gateway.cli import main
from gateway.config import ENV_OVERRIDES
from gateway.demo import curl_lines

GATEWAY_SCRIPT = Path(sys.executable).parent / "gateway"
LAUNCHERS = {
    "module": [sys.executable, "-m", "gateway"],
    "script": [str(GATEWAY_SCRIPT)],
}
RUN_TIMEOUT_S = 60.0  # generous: a cold interpreter start on a noisy CI box
SERVE_DEADLINE_S = 30.0

VALID_TOML = """\
[store]
url = "memory://"

[[rate_limit]]
name = "per-client"
limit = 10
period = "1m"
"""

# Four mistakes: a bound, an unparsable duration, a bad choice, an unknown key.
INVALID_TOML = """\
[server]
port = 70000

[[rate_limit]]
name = "per-client"
period = "fast"

[idempotency]
on_lost_claim = "sometimes"
typo = 1
"""
INVALID_KEYS = {"server.port", "rate_limit[0].period", "idempotency.on_lost_claim", "idempotency.typo"}

BAD_ARGV = [
    pytest.param(["frobnicate"], id="unknown-command"),
    pytest.param([], id="no-command"),
    pytest.param(["check"], id="check-without-file"),
    pytest.param(["check", "a.toml", "b.toml"], id="check-two-files"),
    pytest.param(["demo", "--port", "99999"], id="port-too-large"),
    pytest.param(["demo", "--port", "abc"], id="port-not-a-number"),
    pytest.param(["demo", "--port", "-1"], id="port-negative"),
    pytest.param(["demo", "--port"], id="port-without-value"),
    pytest.param(["demo", "--nope"], id="unknown-option"),
    pytest.param(["--bogus"], id="unknown-global-option"),
]


# ------------------------------------------------------------------------------------ helpers
def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without the GATEWAY_* overrides, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_OVERRIDES}
    env.update(extra)
    return env


def run(command: list[str], *args: str, cwd: Path, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run one gateway command line to completion and capture its output."""
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=cwd,
        env=child_env() if env is None else env,
        check=False,
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def key_of(line: str) -> str:
    return line.split(": ", 1)[0]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process this test started: terminate, wait, kill only if it will not go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs read os.environ: make sure no override leaks in from outside."""
    for var in ENV_OVERRIDES:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(params=sorted(LAUNCHERS))
def launcher(request: pytest.FixtureRequest) -> list[str]:
    """``python -m gateway`` or the ``gateway`` console script next to this interpreter."""
    command: list[str] = LAUNCHERS[request.param]
    return command


@pytest.fixture
def valid_file(tmp_path: Path) -> Path:
    return write(tmp_path, "valid.toml", VALID_TOML)


@pytest.fixture
def invalid_file(tmp_path: Path) -> Path:
    return write(tmp_path, "invalid.toml", INVALID_TOML)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port held by a listening socket of this test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_console_script_is_installed() -> None:
    """The `gateway` console script sits next to the interpreter that runs the tests."""
    assert GATEWAY_SCRIPT.is_file()
    assert os.access(GATEWAY_SCRIPT, os.X_OK)


# ------------------------------------------------------------------------------------ check
class TestCheckInProcess:
    def test_valid_file(self, valid_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`gateway check` on a valid file returns 0 and writes nothing to stderr."""
        assert main(["check", str(valid_file)]) == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        assert str(valid_file) in captured.out

    def test_invalid_file(self, invalid_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An invalid file returns 2 with exactly one stderr line per problem, key first."""
        assert main(["check", str(invalid_file)]) == 2
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == len(INVALID_KEYS)
        assert {key_of(line) for line in lines} == INVALID_KEYS
        assert 'rate_limit[0].period: expected a duration like "2s", got "fast"' in lines
        assert "Traceback" not in captured.out + captured.err

    def test_lines_are_the_config_problems(
        self, invalid_file: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The stderr lines are exactly ConfigError.problems for the same file."""
        with pytest.raises(ConfigError) as info:
            load_config(invalid_file, env={})
        assert main(["check", str(invalid_file)]) == 2
        assert tuple(capsys.readouterr().err.splitlines()) == info.value.problems

    def test_missing_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A missing file returns 2 with one stderr line naming the file."""
        path = tmp_path / "nope.toml"
        assert main(["check", str(path)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"{path}: ")

    def test_syntax_error(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A TOML syntax error returns 2 with one stderr line naming the file."""
        path = write(tmp_path, "broken.toml", "[store\nurl = 1\n")
        assert main(["check", str(path)]) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.splitlines()
        assert line.startswith(f"{path}: ")
        assert "Traceback" not in captured.err

    def test_duration_under_its_bound(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A ttl too short to dedupe a retry fails the check: exit 2, one line naming the key."""
        path = write(tmp_path, "short-ttl.toml", '[idempotency]\nttl = "0.0000001ms"\n')
        assert main(["check", str(path)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line == 'idempotency.ttl: must be at least 1s and at most 1e+09s, got "0.0000001ms"'

    def test_bad_env_override(
        self, valid_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bad GATEWAY_STORE_URL fails the check with one line naming the variable."""
        monkeypatch.setenv("GATEWAY_STORE_URL", "bogus")
        assert main(["check", str(valid_file)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("store.url (from GATEWAY_STORE_URL): ")


class TestCheckSubprocess:
    def test_valid_file(self, launcher: list[str], valid_file: Path, tmp_path: Path) -> None:
        """A valid file exits 0 with an empty stderr."""
        result = run(launcher, "check", str(valid_file), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""

    def test_invalid_file(self, launcher: list[str], invalid_file: Path, tmp_path: Path) -> None:
        """An invalid file exits 2 with one stderr line per problem, each starting with its key."""
        result = run(launcher, "check", str(invalid_file), cwd=tmp_path)
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert len(lines) == len(INVALID_KEYS)
        assert {key_of(line) for line in lines} == INVALID_KEYS
        assert "Traceback" not in result.stdout + result.stderr

    def test_missing_file(self, launcher: list[str], tmp_path: Path) -> None:
        """A missing file exits 2 with exactly one stderr line naming it."""
        result = run(launcher, "check", "does-not-exist.toml", cwd=tmp_path)
        assert result.returncode == 2
        (line,) = result.stderr.splitlines()
        assert line.startswith("does-not-exist.toml: ")
        assert "Traceback" not in result.stderr

    def test_syntax_error(self, launcher: list[str], tmp_path: Path) -> None:
        """A TOML syntax error exits 2 with one line naming the file."""
        path = write(tmp_path, "broken.toml", "a = \n")
        result = run(launcher, "check", str(path), cwd=tmp_path)
        assert result.returncode == 2
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"{path}: ")

    def test_env_override_is_read(self, launcher: list[str], valid_file: Path, tmp_path: Path) -> None:
        """The child's GATEWAY_UPSTREAM_URL is validated: a bad one exits 2 naming it."""
        env = child_env(GATEWAY_UPSTREAM_URL="ftp://nope")
        result = run(launcher, "check", str(valid_file), cwd=tmp_path, env=env)
        assert result.returncode == 2
        (line,) = result.stderr.splitlines()
        assert line.startswith("upstream.url (from GATEWAY_UPSTREAM_URL): ")

    def test_good_env_override_passes(
        self, launcher: list[str], valid_file: Path, tmp_path: Path
    ) -> None:
        """A well-formed GATEWAY_STORE_URL passes the check (no connection is attempted)."""
        env = child_env(GATEWAY_STORE_URL="redis://127.0.0.1:1/0")
        result = run(launcher, "check", str(valid_file), cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------ command line
class TestCommandLine:
    @pytest.mark.parametrize("argv", BAD_ARGV)
    def test_bad_argv_in_process(self, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        """A bad command line returns 2 with exactly one non-empty stderr line."""
        assert main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].strip()
        assert "Traceback" not in captured.err
        assert captured.out == ""

    @pytest.mark.parametrize("argv", BAD_ARGV)
    def test_bad_argv_subprocess(self, argv: list[str], launcher: list[str], tmp_path: Path) -> None:
        """A bad command line exits 2 with exactly one non-empty stderr line, no traceback."""
        result = run(launcher, *argv, cwd=tmp_path)
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].strip()
        assert "Traceback" not in result.stderr

    def test_port_error_names_the_value(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A bad --port value is named in the one error line."""
        assert main(["demo", "--port", "99999"]) == 2
        assert "99999" in capsys.readouterr().err

    def test_unknown_command_is_named(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An unknown command is named in the one error line."""
        assert main(["frobnicate"]) == 2
        assert "frobnicate" in capsys.readouterr().err

    @pytest.mark.parametrize(
        ("argv", "mentions"),
        [(["--help"], ["check", "demo"]), (["check", "--help"], ["FILE"]), (["demo", "--help"], ["--port"])],
        ids=["top", "check", "demo"],
    )
    def test_help_in_process(
        self, argv: list[str], mentions: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--help returns 0 and prints the usage on stdout."""
        assert main(argv) == 0
        out = capsys.readouterr().out
        for word in mentions:
            assert word in out

    def test_help_subprocess(self, launcher: list[str], tmp_path: Path) -> None:
        """`gateway --help` exits 0 and lists the commands."""
        result = run(launcher, "--help", cwd=tmp_path)
        assert result.returncode == 0
        assert "check" in result.stdout
        assert "demo" in result.stdout


# ------------------------------------------------------------------------------------ demo
class TestDemoPortBusy:
    def test_busy_port(self, launcher: list[str], busy_port: int, tmp_path: Path) -> None:
        """`demo --port P` on a port already bound exits 2 with one line naming the port."""
        result = run(launcher, "demo", "--port", str(busy_port), cwd=tmp_path)
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1, lines
        assert str(busy_port) in lines[0]
        assert "Traceback" not in result.stderr
        assert "curl" not in result.stdout


def wait_until_serving(client: httpx.Client, proc: subprocess.Popen[bytes], stderr: Path) -> None:
    """Poll /hello (with a probe API key, so its own bucket) until it answers or time is up."""
    deadline = time.monotonic() + SERVE_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            response = client.get("/hello", headers={"X-API-Key": "readiness-probe"})
        except httpx.TransportError:
            pass
        else:
            assert response.status_code == 200, response.text
            return
        try:  # the poll interval doubles as a check that the demo is still alive
            code = proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"gateway demo exited with {code}: {stderr.read_text()}")
    pytest.fail(f"gateway demo did not serve within {SERVE_DEADLINE_S}s: {stderr.read_text()}")


RATELIMIT_RE = re.compile(r'^"per-client";r=(\d+);t=(\d+)$')


@contextlib.contextmanager
def running_demo(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """``gateway demo`` on a free port, serving: (base URL, stdout file, stderr file); stopped
    by its PID afterwards."""
    port = free_port()
    out_path, err_path = tmp_path / "demo.out", tmp_path / "demo.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port)],
            stdout=out, stderr=err, cwd=tmp_path, env=child_env(),
        )
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10.0, trust_env=False) as client:
            wait_until_serving(client, proc, err_path)
        yield base, out_path, err_path
    finally:
        stop(proc)


class TestDemoServes:
    def test_demo_prints_an_idempotent_replay(self) -> None:
        """The demo's curl lines include a request carrying an Idempotency-Key."""
        lines = curl_lines("http://127.0.0.1:8080")
        assert any("Idempotency-Key" in line and line.startswith("curl") for line in lines)

    def test_demo_rate_limits_and_prints_curl_lines(self, tmp_path: Path) -> None:
        """The demo serves /hello: five 200s with RateLimit fields, then a 429 problem+json."""
        with running_demo(tmp_path) as (base, out_path, err_path):
            port = int(base.rsplit(":", 1)[1])
            with httpx.Client(base_url=base, timeout=10.0, trust_env=False) as client:
                responses = [client.get("/hello") for _ in range(6)]
                other_client = client.get("/hello", headers={"X-API-Key": "alice"})

        passed, denied = responses[:5], responses[5]
        remaining = []
        for response in passed:
            assert response.status_code == 200
            assert response.json() == {"hello": "world"}
            assert response.headers["RateLimit-Policy"] == '"per-client";q=5;w=60'
            match = RATELIMIT_RE.match(response.headers["RateLimit"])
            assert match, response.headers["RateLimit"]
            remaining.append(int(match.group(1)))
            assert response.headers["X-Request-Id"]
        assert remaining == [4, 3, 2, 1, 0]

        assert denied.status_code == 429
        assert denied.headers["content-type"].startswith("application/problem+json")
        body = denied.json()
        assert body["violated-policies"] == ["per-client"]
        assert body["status"] == 429
        assert denied.headers["X-Request-Id"]
        assert denied.headers["RateLimit-Policy"] == '"per-client";q=5;w=60'
        match = RATELIMIT_RE.match(denied.headers["RateLimit"])
        assert match, denied.headers["RateLimit"]
        assert match.group(1) == "0"
        retry_after = int(denied.headers["Retry-After"])
        assert retry_after >= max(1, int(match.group(2)))

        assert other_client.status_code == 200  # another API key has its own bucket

        stdout = out_path.read_text()
        curl_lines = [line for line in stdout.splitlines() if "curl " in line]
        assert len(curl_lines) >= 2
        for line in curl_lines:
            assert f"http://127.0.0.1:{port}/" in line
        assert f"curl -i http://127.0.0.1:{port}/hello" in stdout
        assert "Traceback" not in err_path.read_text()

    def test_printed_metrics_line_shows_what_the_demo_counted(self, tmp_path: Path) -> None:
        """After the printed /hello loop, the printed metrics line shows its 5 passes and 1 denial
        (plus the readiness poll's one pass, under its own API key)."""
        with running_demo(tmp_path) as (_, out_path, _err):
            printed = [line.strip() for line in out_path.read_text().splitlines()]
            loop = next(line for line in printed if line.startswith("for i in"))
            metrics_line = next(line for line in printed if "/_gateway/metrics" in line)
            probes = next(line for line in printed if "/_gateway/healthz" in line)

            def sh(line: str) -> str:
                return subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30,
                                      check=True).stdout

            codes = sh(loop).split()
            counted = sh(metrics_line)
            health = sh(probes)
        assert codes == ["200"] * 5 + ["429"]
        assert 'gateway_ratelimit_decisions_total{decision="allow",policy="per-client"} 6.0' in counted
        assert 'gateway_ratelimit_decisions_total{decision="deny",policy="per-client"} 1.0' in counted
        assert 'gateway_requests_total{code="200"} 6.0' in counted
        assert 'gateway_requests_total{code="429"} 1.0' in counted
        assert health == '{"status":"ok"}{"status":"ready","breaker":"closed"}'

    def test_printed_report_line_shows_a_concurrency_refusal(self, tmp_path: Path) -> None:
        """Three slow reports at once: two run (200), the third is refused as too many in flight."""
        with running_demo(tmp_path) as (_, out_path, err_path):
            printed = [line.strip() for line in out_path.read_text().splitlines()]
            line = next(line for line in printed if "/report" in line and line.startswith("for i in"))
            out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30,
                                 check=True).stdout
        codes = sorted(row.rsplit(" ", 1)[1] for row in out.strip().splitlines())
        assert codes == ["200", "200", "429"], out
        assert "urn:gateway:problem:concurrency-limit-exceeded" in out
        assert "Traceback" not in err_path.read_text()

    def test_printed_charge_lines_show_replay_422_400_and_409(self, tmp_path: Path) -> None:
        """The demo's printed charge lines, run by curl, give 201, its replay, 422, 400 and a 409."""
        with running_demo(tmp_path) as (_, out_path, err_path):
            printed = [line.strip() for line in out_path.read_text().splitlines()]
            charge_lines = [line for line in printed if line.startswith("curl") and "/charges" in line]
            outputs = [
                subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30,
                               check=True).stdout
                for line in charge_lines
            ]

        first, again, other_body, no_key, together = outputs
        assert first.startswith("HTTP/1.1 201"), first
        assert "idempotent-replayed" not in first.lower()
        assert again.startswith("HTTP/1.1 201"), again
        assert "idempotent-replayed: true" in again.lower()
        charge_id = re.search(r'"id":"(ch_\d+)"', first)
        assert charge_id is not None, first
        assert charge_id.group(0) in again  # the same charge, not a second one
        assert other_body.startswith("HTTP/1.1 422"), other_body
        assert no_key.startswith("HTTP/1.1 400"), no_key
        assert '"status":409' in together, together
        assert together.count('"id":"ch_') == 1  # the concurrent pair charged once
        assert "Traceback" not in err_path.read_text()


# ------------------------------------------------------------------------------- serve, bad files
class TestServeAndBadFiles:
    def test_serve_command_documents_its_options(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`gateway serve --help` documents --config, --host, --port and --workers."""
        assert main(["serve", "--help"]) == 0
        out = capsys.readouterr().out
        for option in ("--config", "--host", "--port", "--workers"):
            assert option in out

    @pytest.mark.parametrize("argv", [["serve"], ["serve", "--config", "x.toml", "--workers", "0"],
                                      ["serve", "--config", "x.toml", "--port", "99999"]])
    def test_serve_bad_command_line_is_one_line(
        self, argv: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A bad `serve` command line exits 2 with one line on stderr."""
        assert main(argv) == 2
        assert len(capsys.readouterr().err.splitlines()) == 1

    def test_serve_memory_store_with_workers_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """memory:// with --workers 2 exits 2 naming store.url: limits would not be shared."""
        path = write(tmp_path, "mem.toml", '[store]\nurl = "memory://"\n')
        assert main(["serve", "--config", str(path), "--workers", "2", "--port", "0"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1
        assert err[0].startswith("store.url:")

    def test_serve_bad_config_names_the_key(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A bad config exits 2 with one line per problem, each naming its key."""
        path = write(tmp_path, "bad.toml", '[upstream]\nurl = "ftp://x"\ntimeout = "soon"\n')
        assert main(["serve", "--config", str(path)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert [line.split(":")[0] for line in err] == ["upstream.url", "upstream.timeout"]

    @pytest.mark.parametrize(
        "content",
        [
            pytest.param(b"\xff\xfe[store]\n", id="not-utf8"),
            pytest.param(b"[idempotency]\nttl = 1" + b"0" * 400 + b"\n", id="huge-integer"),
            pytest.param(b"a = " + b"[" * 3000 + b"]" * 3000 + b"\n", id="deep-nesting"),
        ],
    )
    def test_bad_file_without_traceback(self, content: bytes, tmp_path: Path) -> None:
        """Any bad config file exits 2 with one line, never a traceback."""
        path = tmp_path / "bad.toml"
        path.write_bytes(content)
        result = run(LAUNCHERS["module"], "check", str(path), cwd=tmp_path)
        assert "Traceback" not in result.stderr
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1

    def test_unknown_key_with_newline_is_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """One unknown key is one stderr line, even when its name contains a newline."""
        path = write(tmp_path, "nl.toml", '"bad\\nkey" = 1\n')
        assert main(["check", str(path)]) == 2
        assert len(capsys.readouterr().err.splitlines()) == 1
