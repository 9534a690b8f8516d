"""Paste npm's browser builds of vega, vega-lite and vega-embed into .dvc/plots/page.html.

    cd "$(mktemp -d)" && npm install --ignore-scripts vega@5 vega-lite@5 vega-embed@6
    python <repo>/.dvc/plots/vendor/inline.py "$PWD"

Each `<script data-package="NAME" ...>` element of page.html gets node_modules/NAME/build/
NAME.min.js byte for byte, and its version; beside this script it writes SHA256SUMS, the
package's LICENSE (vega's npm package has none: LICENSE.vega is from github.com/vega/vega)
and THIRD-PARTY-NOTICES.txt, the licences of every package in their npm dependency tree
(the browser builds bundle part of it).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("vega", "vega-lite", "vega-embed")
HERE = Path(__file__).resolve().parent
PAGE = HERE.parent / "page.html"
# dvc-render fills these in the page: none may appear inside a pasted script
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")


def licence_text(package: Path) -> str | None:
    files = sorted(p for p in package.iterdir() if re.match(r"(?i)licen[cs]e", p.name))
    return files[0].read_text(encoding="utf-8").strip() if files else None


def notices(folder: Path) -> str:
    """The licences of the installed dependency tree, one text per group of packages."""
    listed = subprocess.run(
        ["npm", "ls", "--all", "--omit=dev", "--parseable"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    by_text = defaultdict(list)
    for path in sorted({Path(p) for p in listed if "node_modules" in p}):
        meta = json.loads((path / "package.json").read_text(encoding="utf-8"))
        if meta["name"] in PACKAGES:
            continue  # their own LICENSE.<name> files
        text = (
            licence_text(path)
            or f"(no licence file in the package; package.json: {meta.get('license')})"
        )
        by_text[text].append(f"{meta['name']}@{meta['version']} ({meta.get('license')})")
    parts = [f"{chr(10).join(sorted(names))}\n\n{text}" for text, names in by_text.items()]
    header = "Licences of the npm dependency tree of " + ", ".join(PACKAGES) + ".\n"
    return header + "".join(f"\n{'=' * 78}\n{part}\n" for part in sorted(parts))


def main(folder: Path) -> None:
    page = PAGE.read_text(encoding="utf-8")
    sums = []
    for name in PACKAGES:
        package = folder / "node_modules" / name
        version = json.loads((package / "package.json").read_text(encoding="utf-8"))["version"]
        code = (package / "build" / f"{name}.min.js").read_text(encoding="utf-8")
        if re.search(r"</script", code, re.IGNORECASE) or any(p in code for p in PLACEHOLDERS):
            sys.exit(f"error: {name}@{version}'s build cannot be pasted into an HTML page as is")
        element = re.compile(rf'<script data-package="{name}"[^>]*>.*?</script>', re.DOTALL)
        new = f'<script data-package="{name}" data-version="{version}">\n{code}\n</script>'
        page, count = element.subn(lambda _, new=new: new, page)  # no escapes read in `code`
        if count != 1:
            sys.exit(f'error: {PAGE} needs one <script data-package="{name}"> element')
        if (licence := licence_text(package)) is not None:
            (HERE / f"LICENSE.{name}").write_text(licence + "\n", encoding="utf-8")
        digest = hashlib.sha256(code.encode()).hexdigest()
        sums.append(f"{digest}  {name}@{version} build/{name}.min.js\n")
        print(f"{name}@{version}: {len(code):,} bytes")
    PAGE.write_text(page, encoding="utf-8")
    (HERE / "SHA256SUMS").write_text("".join(sums))
    (HERE / "THIRD-PARTY-NOTICES.txt").write_text(notices(folder), encoding="utf-8")
    print(f"wrote {PAGE} ({PAGE.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
