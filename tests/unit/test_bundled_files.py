"""The bundled published config files are byte-identical to the Hub files they claim to be."""

from __future__ import annotations

import hashlib

from ..conftest import BUNDLED, PUBLISHED


def _sums() -> dict[str, str]:
    lines = (BUNDLED / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines if line.strip())}


def test_every_bundled_file_matches_its_checksum():
    sums = _sums()
    on_disk = {str(p.relative_to(BUNDLED)) for name in PUBLISHED for p in (BUNDLED / name).iterdir()}
    assert on_disk == set(sums), "SHA256SUMS and the bundled folders list different files"
    for name, digest in sums.items():
        assert hashlib.sha256((BUNDLED / name).read_bytes()).hexdigest() == digest, name


def test_the_checksums_pin_the_published_tokenizer():
    # the pin of SOURCES.md (shared/hf-configs): tokenizer.json sha256 5ece781d...4331a
    assert _sums()["SmolVLM-256M-Instruct/tokenizer.json"].startswith("5ece781d")
    assert _sums()["SmolVLM-256M-Instruct/tokenizer.json"].endswith("4331a")
