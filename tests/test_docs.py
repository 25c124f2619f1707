"""Every relative link in README.md, docs/*.md and benchmarks/README.md resolves, anchors included.

Anchors follow GitHub's rule: the heading's text as rendered, lower-cased, every character that is not a
letter, digit, space, hyphen or underscore removed, spaces turned into hyphens, and "-1", "-2", ... added to
repeats. Links inside code (fenced blocks, `inline`) are not links and are skipped.
"""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
OTHER_PAGES = ["benchmarks/README.md"]  # linked from docs/, beside the scripts it describes

_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The page without its code: fenced blocks and inline code spans."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's markdown text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"[`*]|(?<!\w)_|_(?!\w)", "", text)  # code and emphasis marks are not rendered
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, heading in _HEADING.findall(_FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: str, root: str = ROOT) -> list[str]:
    """Each relative link of `page` (a path under root) that does not resolve, as 'target (why)'."""
    path = os.path.join(root, page)
    text = open(path, encoding="utf-8").read()
    broken = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            broken.append(f"{target} (no such file)")
        elif anchor and (os.path.isdir(dest) or not dest.endswith(".md")):
            broken.append(f"{target} (an anchor into something that is not a markdown page)")
        elif anchor and anchor not in anchors(open(dest, encoding="utf-8").read()):
            broken.append(f"{target} (no heading with that anchor)")
    return broken


def test_slugs_follow_githubs_rule():
    assert slug("Your own corpus") == "your-own-corpus"
    assert slug("A `gs://` workdir") == "a-gs-workdir"
    assert slug("Scale plan: LLaMA-3 8B, 70B + 8B (`benchmarks/scale_plan.py`)") == \
        "scale-plan-llama-3-8b-70b--8b-benchmarksscale_planpy"
    assert slug("**Bold** and [a link](x.md)") == "bold-and-a-link"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_the_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Real heading\n")
    (tmp_path / "a.md").write_text("[ok](docs/b.md#real-heading) [gone](docs/c.md) [bad](docs/b.md#nope) "
                                   "[web](https://example.org/x) `[code](nowhere.md)` [self](#top)\n# Top\n")
    assert broken_links("a.md", str(tmp_path)) == ["docs/c.md (no such file)",
                                                   "docs/b.md#nope (no heading with that anchor)"]


@pytest.mark.parametrize("page", PAGES + OTHER_PAGES)
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_docs_pages_are_linked_from_the_readme():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for page in PAGES[1:]:
        assert f"]({page})" in readme, f"README.md does not link {page}"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second_exactly():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    first_block = _FENCE.search(readme).group(0).splitlines()
    commands = [line for line in first_block[1:-1] if line and not line.startswith("#")]
    assert commands[0].endswith("pip install -e . && python -m clue_jax.main --config configs/quickstart.py "
                                "--workdir runs/quickstart")
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert commands[1] in ci and len(commands) == 2
    assert readme.index("```bash") < readme.index("## ")  # before any section
