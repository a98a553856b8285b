"""The pages a user reads keep up with the code: every tag a script logs is explained on its algorithm's page, every
line link points at the code it names, and no page points outside the repository."""

import re

import pytest
from conftest import ROOT

SCRIPTS = ["iql.py", "cql_continuous.py", "bcq.py", "awr.py", "mopo.py", "fqe.py", "dt.py", "bcq_discrete.py",
           "cql_discrete.py"]
TAG = re.compile(r'"((?:losses|values|model|charts|eval|dynamics|estimate)/[a-z_]+)')
LINE_LINK = re.compile(r"\[`([^`]+)`\]\(\.\./([a-z_]+\.py)#L(\d+)\)")
PAGES = [ROOT / "README.md", ROOT / "benchmark" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "benchmark" / "results").glob("*.md")), ROOT / "benchmark" / "datasets" / "hopper" / "README.md"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_logged_tag_is_explained_on_the_page(script):
    page = (ROOT / "docs" / script.replace(".py", ".md")).read_text()
    tags = set(TAG.findall((ROOT / script).read_text()))
    assert len(tags) > 10, tags
    missing = sorted(t for t in tags if f"`{t}" not in page)
    assert not missing, f"docs/{script.replace('.py', '.md')} does not explain {missing}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_line_links_point_at_what_they_name(script):
    page = (ROOT / "docs" / script.replace(".py", ".md")).read_text()
    links = LINE_LINK.findall(page)
    assert len(links) >= 5, "the implementation details cite the code by line"
    for name, target, line in links:
        lines = (ROOT / target).read_text().splitlines()
        assert name.split("(")[0] in lines[int(line) - 1], f"{target}#L{line} is not `{name}`: {lines[int(line) - 1]}"


def test_no_page_points_outside_the_repository():
    for page in PAGES:
        assert "../shared" not in page.read_text(), page
