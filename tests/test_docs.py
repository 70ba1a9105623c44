"""The README stays short and its pages stay reachable: at most 300 lines, every doc page
it promises is linked and exists, every relative link and #anchor in README.md and
doc/*.md resolves (anchors by GitHub's heading slugs), and the commands CI and the earlier
reproduction run are still written in it."""
import glob
import os
import re

import pytest

from conftest import ROOT

README = os.path.join(ROOT, "README.md")
MAX_README_LINES = 300
DOC_PAGES = ("usage.md", "own_data.md", "decisions.md", "deployment.md", "serving.md", "tipc.md",
             "performance.md", "security.md", "gpu.md", "parity.md", "layout.md", "data.md",
             "pipeline.md")
TEST_COMMAND = "pip install -r requirements-dev.txt && python -m pytest -q tests"
SEED_COMMANDS = (
    "pip install -r requirements.txt && python main.py --config configs/sample_bottle.yaml"
    " && python main.py --mode infer",
    "python main.py --mode eval",
    "python main.py --mode infer --data_dir sample_data --cls bottle",
    "python export_model.py",
    "python infer.py --data_dir sample_data --cls bottle",
    "bash test_tipc/test_train_inference_python.sh test_tipc/configs/train_infer_python.txt"
    " lite_train_lite_infer",
)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def outside_code(text):
    """The lines of a markdown text that are not inside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def code_blocks(text):
    """Every line inside a fenced code block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            lines.append(line)
    return lines


def github_slug(heading):
    """GitHub's anchor for a heading: formatting dropped, lower case, punctuation removed
    (letters, digits, '-', '_' and spaces kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text):
    """The anchors of a page's headings, duplicates numbered as GitHub does (-1, -2...)."""
    seen, found = {}, set()
    for line in outside_code(text):
        match = re.match(r"#{1,6} +(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        n = seen.get(slug, 0)
        found.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return found


def relative_links(text):
    """Targets of markdown links and images that point into the repository."""
    targets = []
    for line in outside_code(text):
        line = re.sub(r"`[^`]*`", "", line)  # a link inside inline code is not a link
        targets += [t for t in LINK.findall(line)
                    if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]
    return targets


def broken_links(path, root=ROOT):
    """'file: target: why' for each relative link of a markdown file that does not resolve."""
    text = read(path)
    problems = []
    for target in relative_links(text):
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        rel = os.path.relpath(path, root)
        if not os.path.exists(dest):
            problems.append(f"{rel}: {target}: no such file")
        elif anchor and dest.endswith(".md") and anchor not in anchors(read(dest)):
            problems.append(f"{rel}: {target}: no heading with that anchor")
        elif not os.path.realpath(dest).startswith(os.path.realpath(root) + os.sep):
            problems.append(f"{rel}: {target}: outside the repository")
    return problems


def markdown_files():
    return [README] + sorted(glob.glob(os.path.join(ROOT, "doc", "*.md")))


# ------------------------------------------------------------------ the README itself

def test_readme_is_at_most_300_lines():
    lines = read(README).splitlines()
    assert 100 < len(lines) <= MAX_README_LINES, len(lines)


def test_readme_links_every_doc_page_and_each_exists():
    linked = {os.path.normpath(t.partition("#")[0]) for t in relative_links(read(README))}
    for page in DOC_PAGES:
        assert os.path.join("doc", page) in linked, f"README does not link doc/{page}"
        assert os.path.isfile(os.path.join(ROOT, "doc", page)), f"doc/{page} is missing"
    for target in linked:
        if target.startswith("doc" + os.sep) and target.endswith(".md"):
            assert os.path.isfile(os.path.join(ROOT, target)), target


def test_every_doc_page_is_linked_from_the_readme():
    """No orphan page: a doc/*.md that nothing reaches from the README is lost information."""
    linked = {os.path.normpath(t.partition("#")[0]) for t in relative_links(read(README))}
    pages = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "doc", "*.md"))]
    assert pages
    assert not [p for p in pages if os.path.normpath(p) not in linked]


def test_readme_keeps_the_ci_and_seed_commands():
    readme_code = code_blocks(read(README))
    assert TEST_COMMAND in readme_code  # the line CI runs, as one command
    assert TEST_COMMAND in read(os.path.join(ROOT, ".ci", "run")).splitlines()
    for command in SEED_COMMANDS:
        assert any(line.startswith(command) for line in readme_code), command


def test_readme_keeps_the_mvtec_attribution():
    text = " ".join(read(README).split())  # wrapped lines join
    assert "MVTec AD, CC BY-NC-SA 4.0, MVTec Software GmbH" in text


# ------------------------------------------------------------------ links and anchors

@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_and_anchors_resolve(path):
    assert not broken_links(path)


def test_doc_pages_have_one_title():
    for path in glob.glob(os.path.join(ROOT, "doc", "*.md")):
        titles = [line for line in outside_code(read(path)) if re.match(r"# ", line)]
        assert len(titles) == 1, (path, titles)


def test_slugs_follow_github():
    assert github_slug("Which runtime and precision: judged on a trained model") == \
        "which-runtime-and-precision-judged-on-a-trained-model"
    assert github_slug("Data: MVTec AD") == "data-mvtec-ad"
    assert github_slug("`--amp` and float16") == "--amp-and-float16"
    assert github_slug("Long runs: resume, skip, config") == "long-runs-resume-skip-config"
    text = "# A\n## Usage\n```\n# not a heading\n```\n## Usage\n"
    assert anchors(text) == {"a", "usage", "usage-1"}


def test_link_checker_catches_broken_links(tmp_path):
    """The checker is not vacuous: a missing file, a missing anchor and a link out of the
    repository are each reported; good links, links in code and web links are not."""
    (tmp_path / "doc").mkdir()
    (tmp_path / "doc" / "page.md").write_text("# Page\n\n## Real heading\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# T\n\n## Here\n\n[ok](doc/page.md#real-heading) [self](#here) [web](https://x.org/a#b)\n"
        "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        "[gone](doc/missing.md) [bad anchor](doc/page.md#no-such) [own bad](#nope)"
        " [out](../outside.md)\n", encoding="utf-8")
    (tmp_path.parent / "outside.md").write_text("# Out\n", encoding="utf-8")
    problems = broken_links(str(readme), root=str(tmp_path))
    assert [p.split(": ")[1] for p in problems] == [
        "doc/missing.md", "doc/page.md#no-such", "#nope", "../outside.md"], problems
