"""The README an analyst reads in five minutes, and docs whose every link resolves."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def local_links(page: Path) -> list[str]:
    """The targets of a Markdown page's links to files of this repository (no web or in-page links)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold commands, not links
    return [t for t in LINK.findall(text) if not re.match(r"^(https?:|mailto:|#)", t)]


def test_the_readme_is_short_and_keeps_two_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 120
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S) == [
        "pip install -r requirements.txt && streamlit run app.py",
        "pip install -r requirements-dev.txt && python -m pytest"]


def test_every_link_of_the_readme_and_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)} → {target}" for page in pages for target in local_links(page)
              if not (page.parent / target.split("#")[0]).exists()]
    assert not broken, broken
    linked = {(ROOT / t).resolve() for t in local_links(ROOT / "README.md")}
    assert {p.resolve() for p in (ROOT / "docs").glob("*.md")} <= linked  # every docs page is reachable
