"""Every citation of the project's own reference resolves inside the repository.

The convention (docs/METHOD.md, opening lines):
* ``METHOD §2.3``, ``METHOD.md §2.3``, ``docs/METHOD.md §2.3`` and ``METHOD 2.3`` cite section 2.3
  of docs/METHOD.md; ``ADAMIXER`` cites docs/ADAMIXER.md and ``shapes_ov/README.md`` the world spec.
  Lists and ranges (``§4.1, §4.3``, ``§2.3–2.5``, ``§2.6/§7``, ``METHOD 1.2-1.4, 10.2``) cite
  every number they hold (a range its two ends).
* A bare ``§x`` cites the document named last before it in the same paragraph (the run of
  non-blank lines it is in: a docstring paragraph, a comment block, a Markdown paragraph or table);
  with none named, docs/METHOD.md, except inside docs/ADAMIXER.md and shapes_ov/README.md, where it
  cites that file itself.
* ``ADAMIXER.md C1``, ``ADAMIXER C1-C8`` and ``ADAMIXER B15`` cite rows of docs/ADAMIXER.md.
* A section exists when a Markdown heading carries its number (``## 4. Hierarchy 1``,
  ``### 2.3 Decoder``, ``#### 2.3.1 Self-attention``).
* Nothing cites a file outside the repository: the old design notes (WORLD.md, STYLE, ARCHITECTURE)
  and the ``../shared`` folder are gone from the citations.

Scanned: every tracked (or new, not ignored) .py, .md, .yaml/.yml and .txt file and the cell sources of every .ipynb
(outputs skipped). This file itself is left out (its fakes below cite wrong sections on purpose).
"""
import json
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()
DOCS = {"METHOD": "docs/METHOD.md", "ADAMIXER": "docs/ADAMIXER.md", "WORLD": "shapes_ov/README.md"}
SCANNED = (".py", ".md", ".yaml", ".yml", ".txt", ".ipynb")

# A document's name as the text writes it -> its key in DOCS. Longest forms first.
DOC_NAME = re.compile(r"(?:docs/)?\bMETHOD\b(?:\.md)?|(?:docs/)?\bADAMIXER\b(?:\.md)?"
                      r"|shapes_ov/README\.md")
NUM = r"\d+(?:\.\d+)*"
LINK = r"\s*(?:,|/|\+|-|–|—|\band\b|\bor\b)\s*"
# A § citation or range: "§2.3", "§2.6/§7", "§2.3–2.5" ("§4.1, §4.3" gives two matches).
SECTION_CHAIN = re.compile(rf"§\s*({NUM})((?:\s*[-–—/]\s*§?\s*{NUM})*)")  # each "§" of a list on its own
# Numbers right after a document name, without "§": "METHOD 8.1", "METHOD.md 7-8.4".
NAMED_CHAIN = re.compile(rf"({DOC_NAME.pattern})[ \t]+({NUM})((?:{LINK}§?\s*{NUM})*)")
ROW_CHAIN = re.compile(rf"({DOC_NAME.pattern})[ \t(]+(?:(?:corrections?|rows?)[ \t]+)?"
                       r"\b([BC]\d+)\b((?:\s*(?:,|/|-|–|\band\b)\s*[BC]\d+)*)")
OUTSIDE = re.compile(r"\bWORLD\.md\b|\bSTYLE(?:\.md)?\s*§|\bSTYLE\.md\b|\bARCHITECTURE\.md\b"
                     r"|\.\./shared\b|\bshared/design\b")
HEADING = re.compile(r"^#{1,6}[ \t]+(\d+(?:\.\d+)*)\.?(?=[ \t]|$)", re.M)
ROW_ID = re.compile(r"^\|\s*([BC]\d+)\s*\|", re.M)


def doc_key(name: str) -> str:
    return "WORLD" if name.startswith("shapes_ov") else name.removeprefix("docs/").split(".")[0]


def sections(text: str) -> set[str]:
    """Section numbers of the Markdown headings of ``text``."""
    return set(HEADING.findall(text))


def rows(text: str) -> set[str]:
    """Ids of the table rows (``| C1 |``, ``| B15 |``) of ``text``."""
    return set(ROW_ID.findall(text))


def numbers(first: str, rest: str) -> list[str]:
    """Every section number of a chain (a range gives its two ends)."""
    return [first] + re.findall(NUM, rest)


def row_ids(first: str, rest: str) -> list[str]:
    """Every row id of a chain; a range "C1-C8" expands to its members."""
    ids, prev = [first], first
    for sep, rid in re.findall(r"\s*(,|/|-|–|\band\b)\s*([BC]\d+)", rest):
        if sep in "-–" and rid[0] == prev[0]:
            ids += [f"{rid[0]}{i}" for i in range(int(prev[1:]) + 1, int(rid[1:]))]
        ids.append(rid)
        prev = rid
    return ids


def citations(text: str, default: str = "METHOD"):
    """Yield (line number, document key, kind, id) for every citation in ``text``; kind is
    "section" or "row". Bare § take the document named last before them in their paragraph."""
    lines = text.split("\n")
    start = 0
    while start < len(lines):
        if not lines[start].strip():
            start += 1
            continue
        end = start
        while end < len(lines) and lines[end].strip():
            end += 1
        para = "\n".join(lines[start:end])
        names = [(m.start(), doc_key(m.group(0))) for m in DOC_NAME.finditer(para)]
        lineno = lambda pos: start + 1 + para.count("\n", 0, pos)  # noqa: E731
        covered = []
        for m in NAMED_CHAIN.finditer(para):
            covered.append((m.start(2), m.end()))
            for n in numbers(m.group(2), m.group(3)):
                yield lineno(m.start()), doc_key(m.group(1)), "section", n
        for m in SECTION_CHAIN.finditer(para):
            if any(a <= m.start() < b for a, b in covered):
                continue
            before = [key for pos, key in names if pos < m.start()]
            doc = before[-1] if before else default
            for n in numbers(m.group(1), m.group(2)):
                yield lineno(m.start()), doc, "section", n
        for m in ROW_CHAIN.finditer(para):
            for rid in row_ids(m.group(2), m.group(3)):
                yield lineno(m.start()), doc_key(m.group(1)), "row", rid
        start = end


def problems(path: str, text: str, docs: dict[str, str]) -> list[str]:
    """What is wrong with the citations of one file's ``text``; ``docs`` maps a key of DOCS to
    that document's text ('' if the repository lacks it)."""
    own = next((k for k, p in DOCS.items() if p == path and k != "METHOD"), "METHOD")
    out = []
    for m in OUTSIDE.finditer(text):
        out.append(f"{path}:{text.count(chr(10), 0, m.start()) + 1}: cites {m.group(0)!r}, "
                   "which is outside the repository")
    for line, key, kind, cid in sorted(citations(text, own), key=lambda c: c[0]):
        target = docs.get(key, "")
        found = sections(target) if kind == "section" else rows(target)
        if cid not in found:
            what = f"§{cid}" if kind == "section" else f"row {cid}"
            out.append(f"{path}:{line}: {what} is not in {DOCS[key]}")
    return out


def cell_text(path: Path) -> str:
    """A notebook's cell sources, one paragraph break between cells (outputs are not scanned)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    return "\n\n".join("".join(c.get("source", [])) for c in nb.get("cells", []))


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file
        out = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if p.is_file()
               and ".git" not in p.parts]
    return sorted(f for f in out if f.endswith(SCANNED) and f != THIS and (REPO / f).is_file())


def repository_docs() -> dict[str, str]:
    return {k: (REPO / p).read_text(encoding="utf-8") if (REPO / p).is_file() else ""
            for k, p in DOCS.items()}


def test_the_reference_is_in_the_repository():
    for path in DOCS.values():
        assert (REPO / path).is_file(), f"{path} is missing"
        assert sections((REPO / path).read_text(encoding="utf-8")), f"{path} has no numbered heading"


def test_every_citation_resolves():
    docs = repository_docs()
    found = []
    for f in tracked_files():
        p = REPO / f
        text = cell_text(p) if f.endswith(".ipynb") else p.read_text(encoding="utf-8", errors="replace")
        found += problems(f, text, docs)
    assert not found, f"{len(found)} dangling citation(s):\n" + "\n".join(found)


FAKE_DOCS = {"METHOD": "# T\n## 2. Two\n### 2.3 Three\n#### 2.3.1 Deep\n## 7. Seven\n",
             "ADAMIXER": "# A\n## 1. One\n| C1 | x |\n| C2 | y |\n| B15 | z |\n", "WORLD": "## 3. W\n"}


def test_a_wrong_section_fails():
    ok = ('"""Refs: METHOD §2.3, §2.3.1 and §7; METHOD.md 2.3-7; ADAMIXER.md C1-C2, §1;\n'
          'shapes_ov/README.md §3 and ADAMIXER B15."""\n')
    assert problems("x.py", ok, FAKE_DOCS) == []
    # wrong METHOD section, wrong end of a range, wrong bare § after ADAMIXER, wrong correction id
    bad = ("# METHOD §2.4 (no such section)\n# see METHOD 2.3–8\n"
           "# ADAMIXER.md §1, then §2.3 here means ADAMIXER\n# ADAMIXER.md C1-C3\n")
    found = problems("x.py", bad, FAKE_DOCS)
    assert [f.split(": ")[1] for f in found] == [
        "§2.4 is not in docs/METHOD.md", "§8 is not in docs/METHOD.md",
        "§2.3 is not in docs/ADAMIXER.md", "row C3 is not in docs/ADAMIXER.md"], found
    # a bare § with no document named in its paragraph cites METHOD; a blank line ends the scope
    assert problems("x.md", "ADAMIXER §1\n\n§2.3 is METHOD's\n", FAKE_DOCS) == []
    assert problems("docs/ADAMIXER.md", "§2 here is ADAMIXER's\n", FAKE_DOCS) == [
        "docs/ADAMIXER.md:1: §2 is not in docs/ADAMIXER.md"]


def test_citations_outside_the_repository_fail():
    for text in ["(WORLD.md)", "STYLE §4.6", "see ARCHITECTURE.md", "../shared/design/METHOD.md §2"]:
        assert any("outside the repository" in p for p in problems("x.py", text, FAKE_DOCS)), text
