"""Subscriber CSV files, for ``gateway list import`` and the API's CSV import.

A file has a header line naming its columns (``address`` and any of
``source``, ``ip``, ``user_agent``, ``requested_at``, in any order), or no
header and one address a line. Every row is reported by the line of the file
it starts on (1-based; the header is line 1): a quoted field may hold a line
break, so a row can span lines and row numbers are not line numbers. A bad
row does not spoil the others: the parser returns the rows it could read and
one error per row it could not; ``RegistryService.import_subscribers`` then
validates each row on its own.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

COLUMNS = ("address", "source", "ip", "user_agent", "requested_at")


class CsvFileError(ValueError):
    """The file as a whole cannot be read (encoding, header): nothing is imported."""

    def __init__(self, line: int, reason: str):
        super().__init__(f"line {line}: {reason}")
        self.line, self.reason = line, reason


@dataclass
class ParsedCsv:
    rows: list[dict] = field(default_factory=list)     # {"line", "address", ...columns}
    errors: list[dict] = field(default_factory=list)   # {"line", "address", "result": "invalid", "field", "reason"}


def decode(data: bytes) -> str:
    """UTF-8 (a BOM is dropped); CsvFileError names the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise CsvFileError(line, f"is not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None


def _error(line: int, address: str, fieldname: str, reason: str) -> dict:
    return {"line": line, "address": address, "result": "invalid", "field": fieldname, "reason": reason}


def parse(text: str) -> ParsedCsv:
    out = ParsedCsv()
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    first = True
    while True:
        before = reader.line_num
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # e.g. a NUL byte or an unterminated quote at the end: this row is lost, the
            # reader goes on with the next line
            out.errors.append(_error(before + 1, "", "line", f"not valid CSV: {exc}"))
            if reader.line_num == before:
                break
            continue
        line = before + 1          # the line the row starts on
        if not record or not any(c.strip() for c in record):
            continue               # blank line
        if first:
            first = False
            names = [c.strip().lower() for c in record]
            if "address" in names:
                unknown = [n for n in names if n not in COLUMNS]
                if unknown:
                    raise CsvFileError(line, f"unknown column(s) {', '.join(repr(n) for n in unknown)} in the "
                                             f"header (known: {', '.join(COLUMNS)})")
                doubled = sorted({n for n in names if names.count(n) > 1})
                if doubled:
                    raise CsvFileError(line, f"column(s) {', '.join(doubled)} named twice in the header")
                header = names
                continue
        if header is None:
            address = record[0].strip()
            if len([c for c in record if c.strip()]) > 1:
                out.errors.append(_error(line, address, "line", f"has {len(record)} fields; without a header "
                                         f"line ({', '.join(COLUMNS)}) each line holds one address"))
                continue
            out.rows.append({"line": line, "address": address})
            continue
        if len(record) > len(header):
            out.errors.append(_error(line, record[header.index("address")].strip(), "line",
                                     f"has {len(record)} fields, the header names {len(header)}"))
            continue
        row: dict = {"line": line}
        for i, name in enumerate(header):
            value = record[i].strip() if i < len(record) else ""
            row[name] = value or None
        row["address"] = row.get("address") or ""
        out.rows.append(row)
    return out
