"""Dev mode (``gateway serve --dev``): what only dev mode does.

The loopback-only rule, the self-signed certificate of its STARTTLS, the
embedded upstream that stores relayed mail as a maildir (``relay/devsink.py``)
and the demo account, the banner ``serve --dev`` prints, and the domain
proofs the account commands publish into the dev DNS zone file. The
defaults of a dev config (its files, ports and DNS) are ``config.dev_config``;
the composition root (``app.py``) and the command line (``cli.py``) call here.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError, UpstreamSettings

if TYPE_CHECKING:  # the command line imports this module: nothing heavy at import
    from .accounts.store import AccountStore
    from .relay.devsink import DevSink
    from .relay.pool import RelayPool

DEMO_ACCOUNT = ("demo", "demo", "example.com")


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def check_loopback(cfg: Config) -> None:
    """Dev mode binds loopback only: every listener and the HTTP server."""
    if not cfg.dev.enabled:
        return
    for i, listener in enumerate(cfg.listeners):
        if not _is_loopback(listener.address):
            raise ConfigError(cfg.source, f"listeners[{i}].address",
                              f"dev mode binds loopback only, not {listener.address}")
    if cfg.http.enabled and not _is_loopback(cfg.http.address):
        raise ConfigError(cfg.source, "http.address", f"dev mode binds loopback only, not {cfg.http.address}")


def ensure_dev_certificate(cert_file: str, key_file: str, hostname: str,
                           now: datetime.datetime | None = None) -> bool:
    """The self-signed certificate of dev mode's STARTTLS: made on first start
    (and again when it has expired or cannot be read), reused otherwise.
    True when a new one was made."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = now or datetime.datetime.now(datetime.timezone.utc)
    cert_path, key_path = Path(cert_file), Path(key_file)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if cert.not_valid_before_utc <= now < cert.not_valid_after_utc - datetime.timedelta(days=1):
            return False
    except (OSError, ValueError):
        pass
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gateway serve --dev (self-signed)")])
    sans = [x509.DNSName(hostname), x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=397))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return True


def certificate(cfg: Config) -> bool:
    """``ensure_dev_certificate`` for the dev config's ``[tls]`` files; one that
    cannot be written is a ConfigError on ``tls.cert_file``. True when made now."""
    try:
        return ensure_dev_certificate(cfg.tls.cert_file, cfg.tls.key_file, cfg.smtp.hostname)
    except OSError as exc:
        raise ConfigError(cfg.source, "tls.cert_file",
                          f"cannot write the dev certificate {cfg.tls.cert_file}: {exc.strerror}") from None


async def start_upstream(sink: DevSink, relay: RelayPool, accounts: AccountStore) -> None:
    """The embedded upstream ``sink`` (a maildir under ``[dev] outbox``) is
    started and becomes the relay's only upstream, and the demo account
    exists. The caller holds the sink (to close it at shutdown) before this
    starts it."""
    from .accounts.store import AccountError

    port = await sink.start()
    relay.set_upstreams([UpstreamSettings(host="127.0.0.1", port=port)])
    name, password, domain = DEMO_ACCOUNT
    if accounts.cached(name) is None:
        try:
            await accounts.add(name, password, contact="demo@example.com")
            await accounts.add_domain(name, domain, approved_by="dev mode")
        except AccountError:  # another dev process made it meanwhile
            pass


def banner(config: Config, certificate_made: bool) -> str:
    """What ``gateway serve --dev`` prints once it is ready."""
    made = "made now" if certificate_made else "reused"
    return ("DEV MODE (loopback only): AUTH is allowed without TLS on this listener.\n"
            f"  STARTTLS is offered with a self-signed certificate ({made}): {config.tls.cert_file}\n"
            "  demo account: user 'demo', password 'demo', may send as @example.com\n"
            f"  relayed mail is stored as a maildir under {config.dev.outbox}/new/\n"
            f"  DNS: built-in dev records and the zone file {config.dev.zone_file}\n"
            f"  storage: {config.storage.url}\n"
            "  the account, list and block commands run in this directory use this setup")


def publish_proof(config: Config, dom: Any) -> None:
    """Dev mode: the dev zone file is the DNS, so publish the proof there."""
    from .accounts.proof import PROOF_PREFIX, proof_name
    from .dns import devzone

    line = devzone.publish(config.dev.zone_file, proof_name(dom.domain), "TXT", f'"{PROOF_PREFIX}{dom.token}"')
    print(f"dev mode: published it in the dev DNS zone {config.dev.zone_file}:\n  {line}")


def unpublish_proof(config: Config, domain: str, token: str) -> None:
    """Dev mode: this domain's proof (this token: another account's stays) leaves the dev zone."""
    from .accounts.proof import PROOF_PREFIX, proof_name
    from .accounts.store import normalize_domain
    from .dns import devzone

    if devzone.unpublish(config.dev.zone_file, proof_name(normalize_domain(domain)), "TXT",
                         f'"{PROOF_PREFIX}{token}"'):
        print(f"dev mode: its proof record is removed from {config.dev.zone_file}")
