"""gateway/dev.py: the dev-mode helpers of `gateway serve --dev` on their own
(the whole dev mode over real SMTP is in test_config_cli.py)."""
from __future__ import annotations

import dataclasses
import datetime
import ssl

import pytest

from gateway import dev
from gateway.config import ConfigError, dev_config


def test_dev_certificate_is_made_once_reused_and_remade_when_it_expires(tmp_path):
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    now = datetime.datetime.now(datetime.timezone.utc)
    assert dev.ensure_dev_certificate(str(cert), str(key), "gw.dev.localhost", now=now) is True
    first = cert.read_bytes()
    assert key.stat().st_mode & 0o777 == 0o600
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))          # a pair the TLS stack takes
    assert dev.ensure_dev_certificate(str(cert), str(key), "gw.dev.localhost", now=now) is False
    assert cert.read_bytes() == first
    later = now + datetime.timedelta(days=397)        # within a day of its end: made again
    assert dev.ensure_dev_certificate(str(cert), str(key), "gw.dev.localhost", now=later) is True
    assert cert.read_bytes() != first


def test_dev_certificate_that_cannot_be_written_names_the_key(tmp_path):
    (tmp_path / "dev-tls").write_text("a file where the directory should be")
    cfg = dev_config(tmp_path)
    with pytest.raises(ConfigError) as err:
        dev.certificate(cfg)
    assert err.value.key == "tls.cert_file" and "cannot write the dev certificate" in err.value.problem


def test_dev_mode_binds_loopback_only(tmp_path):
    cfg = dev_config(tmp_path)
    dev.check_loopback(cfg)
    wide = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, address="0.0.0.0"))
    with pytest.raises(ConfigError) as err:
        dev.check_loopback(wide)
    assert err.value.key == "http.address" and "loopback only" in err.value.problem
    assert "(made now)" in dev.banner(cfg, True) and "(reused)" in dev.banner(cfg, False)
