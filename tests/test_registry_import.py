"""Subscriber imports with bad rows: the good rows are imported, each bad one is
reported with the reason and where it is (the CLI and the API's CSV body: the
1-based line of the file the row starts on, the header being line 1, which
differs from the row number once a quoted field holds a line break; the API's
JSON body: the 0-based position in ``subscribers`` and the field path), and
the CLI exits with its own status (3) when any row was bad. Over the real CLI
(a separate process) and the real HTTP API."""
from __future__ import annotations

import time

import httpx

from conftest import run_cli_async
from test_registry_cli import ENV, _config, cli
from test_registry_http import _auth, _new_list, _start

FUTURE = int(time.time()) + 10 * 86400

# line: content                                 what it is
CSV = (
    "address,source,ip\n"                        # 1  header
    "ann@example.org,web form,198.51.100.1\n"    # 2  good
    "not-an-address,web form,\n"                 # 3  bad address
    "ben@example.org,\"paper form,\n"            # 4  bad: a quoted source over two lines (a control
    "signed at the fair\",\n"                    # 5  character in the consent evidence)
    "cid@example.org,fair,300.1.2.3\n"           # 6  bad ip (the 5th row, on line 6)
    "\n"                                         # 7  blank
    "dan@example.org,fair,,surplus\n"            # 8  one field too many
    "eve@example.org,,\n"                        # 9  good
    "\"fay@example.org\",\"a note\n"             # 10 bad again, over two lines
    "over two lines\",192.0.2.7\n"               # 11
    "ann@example.org,again,\n"                   # 12 duplicate of line 2
)


async def _setup_cli(tmp_path) -> tuple[str, str]:
    cfg = str(_config(tmp_path))
    for args in (("account", "add", "alice", "--password-env", "PW"),
                 ("account", "domain", "add", "alice", "example.com", "--approve")):
        r = await cli(*args, "--config", cfg)
        assert r.returncode == 0, (args, r.stderr)
    r = await cli("list", "add", "alice", "--name", "News", "--list-id", "news.example.com",
                  "--sender", "news@example.com", "--confirm-from", "confirm@example.com", "--config", cfg)
    assert r.returncode == 0, r.stderr
    return cfg, r.stdout.split()[1]


async def test_cli_import_keeps_good_rows_and_reports_bad_lines(tmp_path):
    cfg, lid = await _setup_cli(tmp_path)
    path = tmp_path / "mixed.csv"
    path.write_text(CSV)
    r = await cli("list", "import", "alice", lid, str(path), "--config", cfg)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.startswith("2 subscriber(s) added as pending"), r.stdout     # lines 2 and 9
    assert "duplicate: 1, invalid: 5" in r.stdout, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{path}:")]
    assert [ln.split(":", 2)[1] for ln in lines] == ["3", "4", "6", "8", "10", "12"], r.stderr
    assert lines[0].startswith(f"{path}:3: invalid: address: not a valid address"), lines
    assert lines[1].startswith(f"{path}:4: invalid: source: must not contain control characters"), lines
    assert lines[2].startswith(f"{path}:6: invalid: ip: ") and "300.1.2.3" in lines[2], lines   # 5th row
    assert lines[3].startswith(f"{path}:8: invalid: has 4 fields, the header names 3"), lines
    assert lines[4].startswith(f"{path}:10: invalid: source: "), lines
    assert lines[5] == f"{path}:12: ann@example.org: duplicate (appears earlier in this import)", lines
    assert "5 bad row(s) not imported" in r.stderr, r.stderr

    r = await cli("list", "show", "alice", lid, "--config", cfg)
    assert "0 confirmed, 2 pending" in r.stdout, r.stdout

    # a file of good rows only: exit 0; a repeated import reports the rows as existing (exit 0)
    good = tmp_path / "good.csv"
    good.write_text("gil@example.org\nhal@example.org\n")
    r = await cli("list", "import", "alice", lid, str(good), "--config", cfg)
    assert r.returncode == 0 and r.stdout.startswith("2 subscriber(s)"), (r.stdout, r.stderr)
    r = await cli("list", "import", "alice", lid, str(good), "--config", cfg)
    assert r.returncode == 0 and "exists: 2" in r.stdout, (r.stdout, r.stderr)
    assert f"{good}:1: gil@example.org: exists" in r.stderr, r.stderr

    # without a header, a line with more than one field is bad (and named by its line)
    plain = tmp_path / "plain.csv"
    plain.write_text("ivy@example.org\n\njon@example.org,Jon\n")
    r = await cli("list", "import", "alice", lid, str(plain), "--config", cfg)
    assert r.returncode == 3 and f"{plain}:3: invalid: has 2 fields; without a header line" in r.stderr, r.stderr

    # whole-file problems: nothing imported, exit 1, the line named
    badcol = tmp_path / "badcol.csv"
    badcol.write_text("address,colour\nkim@example.org,blue\n")
    r = await cli("list", "import", "alice", lid, str(badcol), "--config", cfg)
    assert r.returncode == 1 and "line 1: unknown column(s) 'colour'" in r.stderr, r.stderr
    latin = tmp_path / "latin1.csv"
    latin.write_bytes(b"address,source\nlou@example.org,ok\nmia@example.org,caf\xe9\n")
    r = await cli("list", "import", "alice", lid, str(latin), "--config", cfg)
    assert r.returncode == 1 and "line 3: is not UTF-8" in r.stderr, r.stderr
    r = await cli("list", "show", "alice", lid, "--config", cfg)
    assert "0 confirmed, 5 pending" in r.stdout, r.stdout       # ann eve gil hal ivy

    # the exit status is documented in --help
    r = await run_cli_async("list", "import", "--help", env=ENV)
    assert r.returncode == 0 and "3 some rows were bad" in " ".join(r.stdout.split()), r.stdout


async def test_api_import_reports_bad_rows_and_imports_the_rest(gateway_factory, sink):
    h, base = await _start(gateway_factory, sink)
    key = await h.gw.registry.issue_api_key("alice")
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        lid = (await _new_list(c, key))["id"]
        url = f"/api/v1/lists/{lid}/subscribers/import"

        # JSON: each row on its own; bad ones get their index and field path
        rows = [{"address": "ann@example.org", "source": "form"},     # 0 good
                {"address": "bad@@example.org"},                      # 1 bad address (service check)
                {"address": "ben@example.org", "requested_at": "soon"},   # 2 bad type (model check)
                {"address": "cid@example.org", "colour": "blue"},     # 3 unknown field
                42,                                                   # 4 not an object
                {"address": "dan@example.org", "ip": "300.1.2.3"},    # 5 bad ip
                {"address": "ANN@example.org"},                       # 6 good (local part case counts)
                {"address": "ann@EXAMPLE.org"}]                       # 7 duplicate of 0
        r = await c.post(url, headers=_auth(key), json={"subscribers": rows, "source": "batch"})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["queued"] == 2 and body["invalid"] == 5, body
        res = body["results"]
        assert [x["index"] for x in res] == list(range(8)) and all("line" not in x for x in res)
        assert [x["result"] for x in res] == ["queued", "invalid", "invalid", "invalid", "invalid", "invalid",
                                              "queued", "duplicate"], res
        assert [x.get("field") for x in res] == [None, "subscribers[1].address", "subscribers[2].requested_at",
                                                 "subscribers[3].colour", "subscribers[4]", "subscribers[5].ip",
                                                 None, None], res
        assert res[1]["address"] == "bad@@example.org" and res[4]["address"] == ""
        assert all(x["reason"] for x in res if x["result"] != "queued")
        r = await c.get(f"/api/v1/lists/{lid}/subscribers", headers=_auth(key))
        assert sorted(s["address"] for s in r.json()["subscribers"]) == ["ANN@example.org", "ann@example.org"]

        # CSV: the same file as the CLI's, lines of the file (not row numbers)
        r = await c.post(url, headers={**_auth(key), "Content-Type": "text/csv; charset=utf-8"},
                         params={"source": "csv upload"}, content=CSV.encode())
        assert r.status_code == 202, r.text
        body = r.json()
        res = body["results"]
        assert [(x["line"], x["result"]) for x in res] == [
            (2, "exists"), (3, "invalid"), (4, "invalid"), (6, "invalid"), (8, "invalid"), (9, "queued"),
            (10, "invalid"), (12, "duplicate")], res
        assert body["queued"] == 1 and body["invalid"] == 5
        assert [x.get("field") for x in res if x["result"] == "invalid"] == [
            "address", "source", "ip", "line", "source"], res
        assert all("index" not in x for x in res)
        r = await c.get(f"/api/v1/lists/{lid}/subscribers/eve@example.org", headers=_auth(key))
        assert r.json()["consent"]["source"] == "csv upload", r.text

        # the request as a whole unusable: 422 (or 415), nothing imported
        for kwargs, field in (({"json": {"subscribers": []}}, "subscribers"),
                              ({"json": {"subscribers": [{"address": "x@example.org"}], "colour": 1}}, "colour"),
                              ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, "body"),
                              ({"content": b"address,colour\nx@example.org,1\n",
                                "headers": {"Content-Type": "text/csv"}}, "body")):
            r = await c.post(url, headers={**_auth(key), **kwargs.pop("headers", {})}, **kwargs)
            assert r.status_code == 422 and r.json()["field"] == field, r.text
        r = await c.post(url, headers={**_auth(key), "Content-Type": "text/csv"},
                         content=b"address,colour\nx@example.org,1\n")
        assert "line 1: unknown column(s) 'colour'" in r.json()["reason"], r.text
        too_many = "".join(f"m{i}@example.org\n" for i in range(h.gw.config.registry.max_bulk + 1))
        r = await c.post(url, headers={**_auth(key), "Content-Type": "text/csv"}, content=too_many.encode())
        assert r.status_code == 422 and r.json()["field"] == "subscribers" and "at most" in r.text, r.text
        r = await c.post(url, headers={**_auth(key), "Content-Type": "application/xml"}, content=b"<x/>")
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type", r.text
        r = await c.get(f"/api/v1/lists/{lid}/stats", headers=_auth(key))
        assert r.json()["pending"] == 3, r.text        # ann ANN eve

        # the OpenAPI description shows both bodies and the per-row fields
        spec = (await c.get("/openapi.json")).json()
        op = spec["paths"]["/api/v1/lists/{list_id}/subscribers/import"]["post"]
        assert set(op["requestBody"]["content"]) == {"application/json", "text/csv"}
        assert "line" in spec["components"]["schemas"]["ImportRow"]["properties"]
