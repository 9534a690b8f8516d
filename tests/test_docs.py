"""What the docs promise is tested: every test they cite exists."""

from __future__ import annotations

import re

from conftest import ROOT

CITED = re.compile(r"(test_\w+\.py)::(test_\w+)")


def test_every_test_the_docs_cite_exists() -> None:
    cited = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        cited |= {(page.name, *m.groups()) for m in CITED.finditer(page.read_text())}
    assert len(cited) > 20
    missing = [
        f"{page}: {file}::{test}"
        for page, file, test in sorted(cited)
        if not re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), re.M)
    ]
    assert missing == []
