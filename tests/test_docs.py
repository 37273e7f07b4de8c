"""The documentation's code runs: every Python block of README.md and docs/ is executed.

The blocks of one page run in order, in one namespace, in a temporary folder, on the
backend of this pytest session. A page prepares small data, and checks what a block did,
in hidden code (HTML comments, invisible on the site and on PyPI), and a block says which
backends it is written for:

    <!-- test-code
    x_train = np.random.default_rng(0).random((64, 28, 28, 1), "float32")
    -->

    <!-- test: backend=jax -->
    ```python
    ...
    ```

A block without a `test:` line is TensorFlow code; `backend=jax,torch` lists several,
`backend=any` means every backend, and `test: skip` marks a block that cannot run here
(name the reason after it). A `test-code` comment takes the same `backend=` option.
A page runs once per backend it has blocks for, in that backend's pytest session.
"""

import dataclasses
import linecache
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("tensorflow", "jax", "torch")
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*test:\s*(?P<body>.*?)\s*-->\s*$")
_SETUP = re.compile(r"^\s*<!--\s*test-code(?P<options>[^\n]*)$")


@dataclasses.dataclass
class Block:
    page: str
    line: int  # 1-based line of the block's first code line
    code: str
    backends: tuple
    setup: bool = False
    skip: bool = False


def _backends(options, where):
    match = re.search(r"backend=([\w,]+)", options)
    if not match:
        return ("tensorflow",)
    names = tuple(match.group(1).split(","))
    if names == ("any",):
        return BACKENDS
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise ValueError(f"{where}: unknown backend {unknown} (known: {BACKENDS} or 'any')")
    return names


def parse(path):
    """The Python blocks and set-up comments of a Markdown file, in order."""
    return parse_text(Path(path).read_text(), str(Path(path).relative_to(ROOT)))


def parse_text(text, page):
    """The Python blocks and set-up comments of Markdown `text`, in order."""
    lines = text.splitlines()
    blocks, directive, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        setup = _SETUP.match(line)
        if setup:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->")
            where = f"{page}:{i + 1}"
            blocks.append(
                Block(
                    page,
                    i + 2,
                    "\n".join(lines[i + 1 : end]),
                    _backends(setup.group("options"), where),
                    setup=True,
                )
            )
            i = end + 1
            continue
        match = _DIRECTIVE.match(line)
        if match:
            directive = (match.group("body"), i + 1)
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            indent = len(fence.group("indent"))
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if fence.group("lang") in ("python", "py"):
                body, at = directive if directive else ("", i + 1)
                code = "\n".join(text[indent:] for text in lines[i + 1 : end])
                blocks.append(
                    Block(
                        page,
                        i + 2,
                        code,
                        _backends(body, f"{page}:{at}"),
                        skip=body.startswith("skip"),
                    )
                )
            elif directive:
                raise ValueError(f"{page}:{directive[1]}: a `test:` line before a non-Python block")
            directive = None
            i = end + 1
            continue
        if line.strip():
            directive = None  # a `test:` line applies to the block right below it
        i += 1
    return blocks


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _runnable(path):
    return [b for b in parse(path) if BACKEND in b.backends and not b.skip]


RUNNABLE = {str(p.relative_to(ROOT)): p for p in PAGES if any(not b.setup for b in _runnable(p))}


@pytest.mark.parametrize("page", sorted(RUNNABLE))
def test_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for block in _runnable(RUNNABLE[page]):
        # Padded so that a traceback names the Markdown file's own line numbers, and
        # registered with linecache so that `inspect.getsource` (tf.function's autograph)
        # finds the code of the functions a block defines.
        source = "\n" * (block.line - 1) + block.code + "\n"
        filename = f"<{block.page}, block at line {block.line}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), namespace)


def test_parse_reads_directives():
    text = (
        "<!-- test-code\nx = 1\n-->\n\n"
        "```python\ntf_block = 1\n```\n"
        "<!-- test: backend=jax -->\n```python\njax_block = 1\n```\n"
        "<!-- test: backend=any -->\n  ```python\n  any_block = 1\n  ```\n"
        "<!-- test: skip (needs two machines) -->\n```python\nskipped = 1\n```\n"
        "<!-- test: backend=jax -->\n\nSome prose.\n\n```python\nafter_prose = 1\n```\n"
        "```bash\nmake test\n```\n"
    )
    blocks = parse_text(text, "probe.md")
    assert [b.code for b in blocks] == [
        "x = 1",
        "tf_block = 1",
        "jax_block = 1",
        "any_block = 1",
        "skipped = 1",
        "after_prose = 1",
    ]
    assert [b.backends for b in blocks] == [
        ("tensorflow",),
        ("tensorflow",),
        ("jax",),
        BACKENDS,
        ("tensorflow",),
        ("tensorflow",),  # the directive was separated from its block by prose
    ]
    assert [b.setup for b in blocks] == [True] + [False] * 5
    assert [b.skip for b in blocks] == [False] * 4 + [True, False]
    assert [b.line for b in blocks] == [2, 6, 10, 14, 18, 25]


def test_parse_refuses_unknown_backend():
    with pytest.raises(ValueError, match=r"probe.md:1: unknown backend \['theano'\]"):
        parse_text("<!-- test: backend=theano -->\n```python\npass\n```\n", "probe.md")


def test_every_page_parses_and_has_code_for_this_backend_or_none():
    """A typo in a directive fails here rather than silently skipping a block."""
    total = 0
    for path in PAGES:
        blocks = parse(path)
        total += sum(not b.setup for b in blocks)
    assert total >= 20  # the guides are mostly code: losing the blocks would show here


# ------------------------------------------------------------------------------ links
# A Markdown link or image, `[text](target)` (an optional title after the target).
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose(text):
    """`text` without its fenced code blocks and inline code spans (their brackets and
    `#` lines are code, not links or headings)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            lines.append("")
            continue
        lines.append("" if fenced else re.sub(r"`[^`]*`", lambda m: _code_text(m.group()), line))
    return lines


def _code_text(span):
    return span.strip("`").replace("[", "").replace("]", "").replace("(", "").replace(")", "")


def _slugs(page_lines):
    """The anchors of a page's headings as GitHub and the site (Python-Markdown's `toc`)
    write them, each set with its own suffix for repeated headings."""
    github, site, seen_github, seen_site = set(), set(), {}, {}
    for line in page_lines:
        match = _HEADING.match(line)
        if not match:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2)).lower()
        text = re.sub(r"[^\w\s-]", "", text)
        for slug, seen, found, joiner in (
            (text.strip().replace(" ", "-"), seen_github, github, "-"),
            (re.sub(r"[-\s]+", "-", text.strip()), seen_site, site, "_"),
        ):
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}{joiner}{count}")
    return github, site


def _api_anchor(target_lines, anchor):
    """mkdocstrings writes an anchor per documented object (`keras_sam.SAM`, ...)."""
    return anchor.startswith("keras_sam") and any(line.startswith("::: ") for line in target_lines)


def broken_links(page):
    """`(line, target, why)` for each relative link of `page` whose file or anchor is missing."""
    lines = _prose(page.read_text())
    broken = []
    for number, line in enumerate(lines, 1):
        for target in _LINK.findall(line):
            if re.match(r"[a-z][\w+.-]*:", target):  # https:, mailto:: not checked here
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.is_file():
                broken.append((number, target, "no such file"))
                continue
            if anchor and file.suffix == ".md":
                target_lines = _prose(file.read_text())
                github, site = _slugs(target_lines)
                if _api_anchor(target_lines, anchor):
                    continue
                if anchor not in github or anchor not in site:
                    where = "on GitHub" if anchor not in github else "on the site"
                    broken.append((number, target, f"no heading with this anchor {where}"))
    return broken


LINKED_PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    assert broken_links(page) == []


def test_the_readme_links_into_the_docs_folder_not_a_site_nothing_publishes():
    text = (ROOT / "README.md").read_text()
    targets = [t for line in _prose(text) for t in _LINK.findall(line)]
    assert not [t for t in targets if "keras-sam.github.io" in t]
    docs = {t.split("#")[0] for t in targets if t.startswith("docs/")}
    assert {"docs/index.md", "docs/getting-started.md", "docs/fine-tuning.md"} <= docs


def test_broken_links_finds_a_missing_file_a_missing_anchor_and_skips_code(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## SAM's cost: two passes\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#sams-cost-two-passes) [here](#page) [web](https://x.org/y)\n"
        "[gone](missing.md) [no anchor](other.md#sams-cost) `[code](nowhere.md)`\n"
        "```python\nx = d[k](1)  # [not](a-link.md)\n```\n"
    )
    assert broken_links(page) == [
        (4, "missing.md", "no such file"),
        (4, "other.md#sams-cost", "no heading with this anchor on GitHub"),
    ]
