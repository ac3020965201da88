"""The README's examples, run as printed.

A dev gateway is started as the README says (`gateway serve --dev`, the
console script of this Python's environment first on PATH, as
`. .venv/bin/activate` puts it) in a fresh temporary working directory; every
`gateway account|list|block` command of the README, the swaks session and the
Python snippet of "A first session" are taken from README.md itself and run
through bash in that directory, in the README's order. Each must exit as the
README says, with its key output.

What the test supplies, because the README leaves it to the reader:
- the password at the prompt of `account add shop` and `account passwd shop`
  (on standard input, which the README names as the other way);
- the environment variable BLOG_PW of `account add blog --password-env BLOG_PW`;
- the file subscribers.csv of `list import` (two addresses);
- LIST, which the README says stands for the id that `list add` printed.

Uses the fixed dev ports 127.0.0.1:2525 and 8025 (as the README does):
another run that holds them makes this fail with "address in use"; rerun.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import need, tcp_reachable

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
DEADLINE = 30.0


def gateway_script() -> str | None:
    """The `gateway` console script of the Python running the tests (a venv's
    bin/ beside its python), else the first on PATH."""
    beside = Path(sys.executable).parent / "gateway"
    return str(beside) if beside.exists() else shutil.which("gateway")


# ------------------------------------------------------------------ extracting the README's examples
def section(title: str) -> str:
    """The text under a heading (## or ###) up to the next heading of any level."""
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", README, re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def indented_commands(text: str, prefix: str) -> list[str]:
    """Commands of the indented code blocks that start with ``prefix``
    (after an optional ``$ ``), continuation lines (trailing backslash) joined."""
    out, current = [], None
    for line in text.splitlines():
        if current is not None:
            current += "\n" + line
            if not line.rstrip().endswith("\\"):
                out.append(current)
                current = None
            continue
        if not line.startswith("    "):
            continue
        body = line[4:]
        if body.startswith("$ "):
            body = body[2:]
        if body.startswith(prefix):
            if body.rstrip().endswith("\\"):
                current = body
            else:
                out.append(body)
    return out


def management_commands() -> list[str]:
    cmds = []
    for title in ("Accounts", "Mailing lists", "Block lists"):
        cmds += [c for c in indented_commands(section(title), "gateway ")
                 if c.split()[1] in ("account", "list", "block")]
    return cmds


def python_snippet() -> str:
    return README.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_examples_are_found():
    """The extraction itself: each section holds the commands this test knows."""
    cmds = management_commands()
    words = [" ".join(c.split()[1:3]) for c in cmds]
    for expected in ("account add", "account domain", "account network", "account list", "account show",
                     "account passwd", "account suspend", "account reinstate", "account events", "account apikey",
                     "list add", "list list", "list show", "list import", "list delete",
                     "block add", "block list", "block remove"):
        assert expected in words, (expected, words)
    swaks = indented_commands(section("A first session"), "swaks ")
    assert len(swaks) == 2 and "--auth-user demo" in swaks[0] and "--auth" not in swaks[1]
    assert "smtplib.SMTP(\"127.0.0.1\", 2525)" in python_snippet()


def test_ci_runs_the_readme_test_command():
    """.ci/run calls exactly the README's "Run the whole test suite" command."""
    setup = section("Set up")
    blocks = [line[4:] for line in setup.splitlines() if line.startswith("    ")]
    assert len(blocks) == 2, blocks
    serve, tests = blocks
    assert serve.endswith("gateway serve --dev") and ". .venv/bin/activate" in serve
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci, (tests, ci[-3:])


def test_ci_runs_the_static_checks_the_readme_names():
    """.ci/run checks the code with ruff and mypy (their settings in pyproject.toml) before
    the tests; the README names both commands."""
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ".venv/bin/ruff check ." in ci and ".venv/bin/mypy" in ci
    tests = next(i for i, line in enumerate(ci) if "python -m pytest" in line)
    assert ci.index(".venv/bin/ruff check .") < ci.index(".venv/bin/mypy") < tests
    setup = section("Set up")
    assert "`ruff check .`" in setup and "`mypy`" in setup
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "[tool.mypy]" in pyproject and "check_untyped_defs = true" in pyproject


# ------------------------------------------------------------------ the dev gateway, as the README starts it
class DevGateway:
    def __init__(self, workdir: Path, env: dict):
        self.workdir = workdir
        self.env = env
        self.stderr: list[str] = []
        self.stdout: list[bytes] = []
        self.ready = threading.Event()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DevGateway":
        self.proc = subprocess.Popen(["bash", "-c", "gateway serve --dev"], cwd=self.workdir, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

        def drain_err():
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace")
                self.stderr.append(line)
                if "the account, list and block commands" in line:
                    self.ready.set()
            self.ready.set()

        def drain_out():
            for raw in self.proc.stdout:
                self.stdout.append(raw)

        threading.Thread(target=drain_err, daemon=True).start()
        threading.Thread(target=drain_out, daemon=True).start()
        assert self.ready.wait(DEADLINE), "dev gateway not ready:\n" + "".join(self.stderr)
        assert self.proc.poll() is None, "dev gateway exited:\n" + "".join(self.stderr)
        return self

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)   # bash and the gateway under it
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(DEADLINE)
        return self.proc.returncode


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    need(not tcp_reachable("127.0.0.1", 2525) and not tcp_reachable("127.0.0.1", 8025),
         "the dev ports 127.0.0.1:2525/8025 are in use by something else")
    exe = gateway_script()
    need(exe is not None, "the `gateway` console script is not installed (pip install -e .)")
    workdir = tmp_path_factory.mktemp("readme")
    # As `. .venv/bin/activate` does: this environment's scripts first on PATH.
    env = {**os.environ, "PATH": f"{Path(exe).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("GATEWAY_CONFIG", None)
    gw = DevGateway(workdir, env).start()
    yield gw
    assert gw.stop() == 0, "".join(gw.stderr)


def run(dev: DevGateway, command: str, *, input: str | None = None, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=dev.workdir, env={**dev.env, **(env or {})},
                          input=input, capture_output=True, text=True, timeout=60)


def outbox(dev: DevGateway) -> list[Path]:
    new = dev.workdir / "dev-outbox" / "new"
    return sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns) if new.exists() else []


def wait_outbox(dev: DevGateway, count: int) -> list[Path]:
    deadline = time.monotonic() + DEADLINE
    while len(outbox(dev)) < count:
        assert time.monotonic() < deadline, f"dev outbox holds {len(outbox(dev))} messages, not {count}"
        time.sleep(0.1)
    return outbox(dev)


# ------------------------------------------------------------------ "A first session"
def test_first_session_swaks(dev):
    need(shutil.which("swaks") is not None, "swaks is not installed (apt-get install swaks)")
    with_auth, without = indented_commands(section("A first session"), "swaks ")
    before = len(outbox(dev))
    r = run(dev, with_auth)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "<-  235 2.7.0 Authentication successful" in r.stdout
    assert "<-  250 2.0.0 OK: relayed, trace id " in r.stdout and "Stored in dev outbox as" in r.stdout
    (newest,) = wait_outbox(dev, before + 1)[before:]
    head = newest.read_bytes().split(b"\r\n\r\n", 1)[0]
    assert b"X-Gateway-Trace: " in head and b"Received: " in head

    r = run(dev, without)
    assert r.returncode != 0, r.stdout
    assert "<** 554 5.7.1 P-RELAY Relay access denied: client not authenticated" in r.stdout
    assert len(outbox(dev)) == before + 1


def test_first_session_python(dev):
    before = len(outbox(dev))
    r = subprocess.run([sys.executable, "-c", python_snippet()], cwd=dev.workdir, env=dev.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (newest,) = wait_outbox(dev, before + 1)[before:]
    data = newest.read_bytes()
    assert b"X-Gateway-Trace: " in data and b"Subject: hi\r\n" in data and data.endswith(b"hello\r\n")


# ------------------------------------------------------------------ Accounts, Mailing lists, Block lists
# Key output of each README command (by its first words); a command not
# listed here (one added to the README later) must still exit 0.
EXPECT: list[tuple[str, int, list[str]]] = [
    ("gateway account add shop", 0, ["account shop added"]),
    ("gateway account add blog", 0, ["account blog added"]),
    ("gateway account domain add shop shop.example", 0,
     ["(pending proof)", '_gateway-proof.shop.example. TXT "gateway-proof=',
      "dev mode: published it in the dev DNS zone"]),
    ("gateway account domain verify shop shop.example", 0,
     ["domain shop.example of shop verified (TXT _gateway-proof.shop.example carries the token)"]),
    ("gateway account domain add blog blog.example --approve", 0, ["pre-approved by the operator"]),
    ("gateway account network add shop 2001:db8:5::/48", 0, ["network 2001:db8:5::/48 added to shop"]),
    ("gateway account list", 0, ["shop\tactive\tops@shop.example\tshop.example", "blog\tactive"]),
    ("gateway account show shop", 0, ["status: active", "shop.example: verified", "2001:db8:5::/48"]),
    ("gateway account passwd shop", 0, ["password of shop changed"]),
    ("gateway account suspend shop", 0, ["account shop suspended"]),
    ("gateway account reinstate shop", 0, ["account shop reinstated"]),
    ("gateway account events shop", 0, ["no violations recorded for shop"]),
    ("gateway account domain remove blog blog.example", 0, ["domain blog.example removed from blog"]),
    ("gateway account apikey shop", 0, ["gwk_"]),
    ("gateway list add shop", 0, ["(shop)", "List-Id: \"Shop news\" <news.shop.example>",
                                  "senders: news@shop.example, bounce+*@shop.example"]),
    ("gateway list list shop", 0, ["{LIST}\tnews.shop.example\tShop news"]),
    ("gateway list show shop LIST", 0, ["list {LIST} (shop)", "subscribers: 0 confirmed, 0 pending"]),
    ("gateway list import shop LIST subscribers.csv", 0, ["2 subscriber(s) added as pending"]),
    ("gateway list delete shop LIST", 0, ["list {LIST} deleted"]),
    ("gateway block add ip 192.0.2.0/24", 0, ["blocked ip 192.0.2.0/24"]),
    ("gateway block add domain bad.example", 0, ["blocked domain bad.example"]),
    ("gateway block add hostname mx.bad.example", 0, ["blocked hostname mx.bad.example"]),
    ("gateway block add hostname .dyn.bad.example", 0, ["blocked hostname .dyn.bad.example"]),
    ("gateway block list", 0, ["ip\t192.0.2.0/24\t", "spam run, ticket 4711", "domain\tbad.example",
                               "hostname\t.dyn.bad.example"]),
    ("gateway block remove ip 192.0.2.0/24", 0, ["unblocked ip 192.0.2.0/24"]),
]

# What the reader types or has (see the module docstring).
PASSWORD = "correct horse battery staple\n"
ENV = {"BLOG_PW": "blog password"}
SUBSCRIBERS = "carol@example.org\ndave@example.net\n"


def test_management_commands_as_printed(dev):
    (dev.workdir / "subscribers.csv").write_text(SUBSCRIBERS)
    commands = management_commands()
    list_id = None
    seen = set()
    for printed in commands:
        command = printed
        if re.search(r"\bLIST\b", command):
            assert list_id is not None, f"{printed!r} comes before `gateway list add`"
            command = re.sub(r"\bLIST\b", list_id, command)
        r = run(dev, command, input=PASSWORD, env=ENV)
        out = r.stdout
        expect = next(((code, keys) for prefix, code, keys in EXPECT if printed.startswith(prefix)), (0, []))
        seen.update(prefix for prefix, _, _ in EXPECT if printed.startswith(prefix))
        assert r.returncode == expect[0], f"{printed}\n-> exit {r.returncode}\n{out}{r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        assert "using the dev setup in" in r.stderr      # found the dev gateway's directory, no --dev needed
        if printed.startswith("gateway list add"):
            list_id = re.search(r"^list ([0-9a-f]{16}) \(shop\)", out, re.M).group(1)
        for key in expect[1]:
            key = key.replace("{LIST}", list_id or "")
            assert key in out, f"{printed}\n-> missing {key!r} in:\n{out}"
        if printed.startswith("gateway list import"):
            # the running dev gateway mails each new subscriber a confirmation (into its outbox)
            deadline = time.monotonic() + DEADLINE
            while True:
                to = [p.read_bytes() for p in outbox(dev)]
                if sum(b"X-Dev-Envelope-To: carol@example.org" in m or b"X-Dev-Envelope-To: dave@example.net"
                       in m for m in to) == 2:
                    break
                assert time.monotonic() < deadline, "no confirmation mails in the dev outbox"
                time.sleep(0.2)
    assert seen == {prefix for prefix, _, _ in EXPECT}, {prefix for prefix, _, _ in EXPECT} - seen


def test_links_of_the_readme_and_the_policy_map_lead_into_the_repository():
    """Relative links of README.md and docs/policy.md name files of this
    repository (the policy map once pointed outside it)."""
    for doc in (REPO / "README.md", REPO / "docs" / "policy.md"):
        links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8"))
        assert links, doc
        for link in links:
            if re.match(r"[a-z]+:", link):
                continue
            target = (doc.parent / link).resolve()
            assert target.is_relative_to(REPO) and target.exists(), (doc.name, link)
    assert "(docs/policy.md)" in README
