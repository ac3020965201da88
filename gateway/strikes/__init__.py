"""Accountability (P-STRIKE, issue 13): the violations checks detect, stored."""
