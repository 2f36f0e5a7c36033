"""The tutorials' Python snippets run as written, page by page (files they include from the package included), and
every page is in the site's navigation."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
# A fenced python block runs unless the line before its fence is this marker (for code that needs a GPU or the hub).
SKIP_MARKER = "<!-- not-tested -->"
FENCE = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)
# pymdownx.snippets' include line (mkdocs.yml): the page shows that file of the repository in its place.
INCLUDE = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', re.M)


def snippets(page: Path) -> list[str]:
    blocks = [m["code"] for m in FENCE.finditer("\n" + page.read_text()) if m["before"].strip() != SKIP_MARKER]
    return [INCLUDE.sub(lambda m: (ROOT / m["path"]).read_text(), code) for code in blocks]


@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p)], ids=lambda p: p.name)
def test_page_snippets_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for index, code in enumerate(snippets(page)):
        try:
            exec(compile(code, f"{page.name}[snippet {index}]", "exec"), namespace)
        except Exception as error:  # the page and the snippet, not just a traceback into exec
            raise AssertionError(f"{page.name}: python snippet {index} failed: {error!r}") from error


def test_every_page_is_in_the_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def listed(nav) -> set[str]:
        found = set()
        for item in nav:
            for value in item.values() if isinstance(item, dict) else [item]:
                found |= listed(value) if isinstance(value, list) else {value}
        return found

    assert {p.relative_to(DOCS).as_posix() for p in PAGES} <= listed(config["nav"])
