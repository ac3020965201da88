"""A throw-away Postfix instance for tests: the customer's own MTA using the
gateway as its smarthost (relayhost + SASL AUTH over STARTTLS).

Recipe (Debian's postfix package, run as root, nothing on port 25):

- everything lives in its own directory ``/tmp/gw-postfix-XXXX`` (mode 0755:
  the ``postfix`` user must reach ``data/``, which pytest's 0700 tmp_path
  does not allow): ``etc/`` (main.cf, master.cf, maps, CA), ``queue/``
  (queue_directory, made by ``postfix check``), ``data/`` (data_directory,
  owned by postfix) and ``maillog`` (postlogd's maillog_file);
- master.cf has no ``inet`` service at all, so the instance listens on no
  TCP port; mail is injected with ``sendmail -C etc`` (postdrop -> pickup) and
  leaves only through the ``smtp`` client to ``relayhost``;
- maps are ``texthash:`` (no postmap step); the SASL password map is keyed by
  the relayhost ``[127.0.0.1]:PORT``;
- ``postfix -c etc start``/``stop``/``abort`` and ``postqueue -c etc -j``/``-f``
  address this instance only; all commands run through asyncio subprocesses
  because the gateway under test runs in the test's event loop;
- on stop, anything left in the master's process group is killed.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

POSTFIX_BINARIES = ("postfix", "postqueue", "sendmail", "postconf")


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def postfix_missing() -> str | None:
    """None when a usable Postfix is installed, else the reason it is not."""
    for name in POSTFIX_BINARIES:
        if not Path(_which(name)).exists():
            return f"{name} not found (Debian package postfix is needed)"
    if not Path("/usr/lib/postfix/sbin/master").exists():
        return "/usr/lib/postfix/sbin/master not found (Debian package postfix is needed)"
    try:
        import pwd
        import grp
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except (KeyError, ImportError):
        return "user postfix or group postdrop missing (Debian package postfix is needed)"
    if os.geteuid() != 0:
        return "starting a Postfix instance needs root"
    return None


class PostfixError(RuntimeError):
    pass


async def run(*argv: str, timeout: float = 30.0, stdin: bytes | None = None,
              env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command without blocking the event loop; (exit code, stdout+stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise PostfixError(f"{' '.join(argv)}: no exit within {timeout}s") from None
    return proc.returncode, out.decode("utf-8", "replace")


class Postfix:
    """One Postfix instance relaying everything to ``relayhost``."""

    def __init__(self, *, relay_port: int, ca_file: str | None = None,
                 sasl: tuple[str, str] | None = None,
                 tls_level: str = "encrypt",
                 tls_match: str | None = None,
                 mechanisms: str = "",
                 transports: dict[str, str] | None = None,
                 main: dict[str, Any] | None = None,
                 smtpd_port: int | None = None,
                 virtual: dict[str, str] | None = None):
        self.relay_port = relay_port
        self.relayhost = f"[127.0.0.1]:{relay_port}"
        self.ca_file = ca_file
        self.sasl = sasl
        self.tls_level = tls_level
        self.tls_match = tls_match
        self.mechanisms = mechanisms
        self.transports = transports or {}
        self.extra_main = main or {}
        # an SMTP listener on 127.0.0.1 (the customer's MX taking inbound mail) and
        # virtual aliases (forwarding of inbound mail to outside addresses)
        self.smtpd_port = smtpd_port
        self.virtual = virtual or {}
        self.root = Path(tempfile.mkdtemp(prefix="gw-postfix-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.etc = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.maillog = self.root / "maillog"
        self.master_pid: int | None = None
        self.started = False

    # ------------------------------------------------------------ config
    def main_cf(self) -> dict[str, Any]:
        etc = self.etc
        cf: dict[str, Any] = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": f"postfix-{self.root.name}",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.root,
            "myhostname": "mta.customer.test",
            "mydomain": "customer.test",
            "myorigin": "customer.test",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": self.relayhost,
            "smtp_host_lookup": "native",
            "smtp_helo_name": "mta.customer.test",
            "smtp_connect_timeout": "5s",
            # fast retries; tests also flush with postqueue -f
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "bounce_size_limit": "4096",
            # TLS to the gateway
            "smtp_tls_security_level": self.tls_level,
            "smtp_tls_CApath": "",
            "smtp_tls_loglevel": "1",
            "smtp_tls_session_cache_database": "",
        }
        if self.ca_file:
            cf["smtp_tls_CAfile"] = etc / "ca.pem"
        if self.tls_match:
            cf["smtp_tls_policy_maps"] = f"texthash:{etc / 'tls_policy'}"
        if self.sasl:
            cf.update({
                "smtp_sasl_auth_enable": "yes",
                "smtp_sasl_password_maps": f"texthash:{etc / 'sasl_passwd'}",
                "smtp_sasl_security_options": "noanonymous",
                "smtp_sasl_tls_security_options": "noanonymous",
            })
            if self.mechanisms:
                cf["smtp_sasl_mechanism_filter"] = self.mechanisms
        if self.transports:
            cf["transport_maps"] = f"texthash:{etc / 'transport'}"
        if self.virtual:
            cf["virtual_alias_maps"] = f"texthash:{etc / 'virtual'}"
        cf.update(self.extra_main)
        return cf

    def master_cf(self) -> str:
        # No inet service unless smtpd_port is given. chroot off everywhere.
        inet = f"127.0.0.1:{self.smtpd_port} inet n - n - - smtpd\n" if self.smtpd_port else ""
        return inet + (
            "pickup    unix  n       -       n       60      1       pickup\n"
            "cleanup   unix  n       -       n       -       0       cleanup\n"
            "qmgr      unix  n       -       n       300     1       qmgr\n"
            "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n"
            "rewrite   unix  -       -       n       -       -       trivial-rewrite\n"
            "bounce    unix  -       -       n       -       0       bounce\n"
            "defer     unix  -       -       n       -       0       bounce\n"
            "trace     unix  -       -       n       -       0       bounce\n"
            "verify    unix  -       -       n       -       1       verify\n"
            "flush     unix  n       -       n       1000?   0       flush\n"
            "proxymap  unix  -       -       n       -       -       proxymap\n"
            "smtp      unix  -       -       n       -       -       smtp\n"
            "relay     unix  -       -       n       -       -       smtp\n"
            "showq     unix  n       -       n       -       -       showq\n"
            "error     unix  -       -       n       -       -       error\n"
            "retry     unix  -       -       n       -       -       error\n"
            "discard   unix  -       -       n       -       -       discard\n"
            "anvil     unix  -       -       n       -       1       anvil\n"
            "scache    unix  -       -       n       -       1       scache\n"
            "postlog   unix-dgram n  -       n       -       1       postlogd\n"
            # plain SMTP without AUTH, for routes to test sinks (e.g. bounces)
            "plainsmtp unix  -       -       n       -       -       smtp\n"
            "  -o smtp_tls_security_level=none\n"
            "  -o smtp_sasl_auth_enable=no\n")

    def write_config(self) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix")
        lines = [f"{k} = {v}" for k, v in self.main_cf().items()]
        (self.etc / "main.cf").write_text("\n".join(lines) + "\n")
        (self.etc / "master.cf").write_text(self.master_cf())
        if self.ca_file:
            shutil.copyfile(self.ca_file, self.etc / "ca.pem")
        if self.sasl:
            user, password = self.sasl
            path = self.etc / "sasl_passwd"
            path.write_text(f"{self.relayhost} {user}:{password}\n")
            os.chmod(path, 0o600)
        if self.tls_match:
            (self.etc / "tls_policy").write_text(f"{self.relayhost} secure match={self.tls_match}\n")
        if self.virtual:
            (self.etc / "virtual").write_text("".join(f"{src} {dst}\n" for src, dst in self.virtual.items()))
        if self.transports:
            (self.etc / "transport").write_text(
                "".join(f"{dom} {route}\n" for dom, route in self.transports.items()))

    # ------------------------------------------------------------ commands
    async def cmd(self, *args: str, timeout: float = 30.0, check: bool = True,
                  stdin: bytes | None = None) -> tuple[int, str]:
        rc, out = await run(*args, timeout=timeout, stdin=stdin)
        if check and rc != 0:
            raise PostfixError(f"{' '.join(args)} exited {rc}: {out}\n--- maillog:\n{self.log_tail()}")
        return rc, out

    async def start(self) -> None:
        self.write_config()
        conf = str(self.etc)
        # "check" creates the queue directories with their owners and modes.
        await self.cmd(_which("postfix"), "-c", conf, "check")
        await self.cmd(_which("postfix"), "-c", conf, "start", timeout=60)
        self.started = True
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                self.master_pid = int(pid_file.read_text().split()[0])
                break
            except (OSError, ValueError, IndexError):
                await asyncio.sleep(0.1)
        if self.master_pid is None:
            raise PostfixError(f"no master pid in {pid_file}\n--- maillog:\n{self.log_tail()}")

    async def sendmail(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Inject like a local program would: sendmail -> postdrop -> pickup."""
        await self.cmd(_which("sendmail"), "-C", str(self.etc), "-i", "-f", sender, "--", *recipients,
                       stdin=message)

    async def queue(self) -> list[dict]:
        _, out = await self.cmd(_which("postqueue"), "-c", str(self.etc), "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]

    async def flush(self) -> None:
        await self.cmd(_which("postqueue"), "-c", str(self.etc), "-f")

    async def wait_queue(self, predicate: Callable[[list[dict]], bool], timeout: float = 30.0,
                         what: str = "queue condition") -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            q = await self.queue()
            if predicate(q):
                return q
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what} not reached within {timeout}s; queue={q}\n"
                                     f"--- maillog:\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    async def wait_empty(self, timeout: float = 30.0) -> None:
        await self.wait_queue(lambda q: q == [], timeout, "empty queue")

    async def wait_log(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if time.monotonic() >= deadline:
                raise AssertionError(f"{text!r} not in the maillog within {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    def log(self) -> str:
        try:
            return self.maillog.read_text("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # ------------------------------------------------------------ teardown
    def _group_pids(self) -> list[int]:
        """Live processes in the master's process group (the master is a group leader)."""
        if self.master_pid is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()
            # fields: state ppid pgrp ...
            if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == self.master_pid:
                pids.append(int(entry))
        return pids

    async def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._group_pids():
                return True
            await asyncio.sleep(0.1)
        return not self._group_pids()

    async def stop(self) -> None:
        if self.started:
            conf = str(self.etc)
            try:
                await self.cmd(_which("postfix"), "-c", conf, "stop", check=False, timeout=20)
            except PostfixError:
                pass
            if not await self._wait_gone(5):
                try:
                    await self.cmd(_which("postfix"), "-c", conf, "abort", check=False, timeout=10)
                except PostfixError:
                    pass
                if not await self._wait_gone(3):
                    for pid in self._group_pids():
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    await self._wait_gone(3)
            self.started = False

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
