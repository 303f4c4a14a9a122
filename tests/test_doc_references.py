"""The names the docs give must exist, so that a rename cannot leave a doc pointing at nothing.

Read: README.md, docs/*.md, the docstrings and comments of every .py file of the project (not the virtual
environment) and the comments of its shell scripts. Checked, statically (no project module is imported):

- a dotted name under `utils` (a module, or a module's attribute, or a class's attribute): the module's
  file exists and the attribute is defined, assigned or imported at its top level (a class's attribute in
  the class's body);
- `<file>.py:<name>` and `<path>/<file>.py:<name>`: the file exists (a bare name: some file of the
  project of that name) and defines `<name>` (a def, a class or an assignment, at any depth);
- `<file>.py:<line>` and `<file>.py:<first>-<last>`: the file exists and has that many lines;
- a path of the project's own folders (utils/, datasets/, scripts/, tests/, docs/) ending in .py, .md or
  .sh: the file exists;
- a section named after a document (README or docs/<name>.md, then the section's title in double
  quotes): the document has a heading, or a paragraph opening in bold, that starts with those words;
- a link of README.md or docs/*.md to a file of the project (`[text](docs/<name>.md#<anchor>)`): the file
  exists, and so does the anchor's heading.

A failure names the file, the line and the name that does not resolve, one per line."""
import ast
import io
import os
import re
import tokenize
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {"__pycache__", "node_modules"}
OWN_FOLDERS = ("utils", "datasets", "scripts", "tests", "docs")

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
DOTTED = re.compile(rf"(?<![\w./-])utils(?:\.{IDENT})+")
PY_FILE = r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.py)"
FILE_NAME = re.compile(PY_FILE + rf":({IDENT})")
FILE_LINE = re.compile(PY_FILE + r":(\d+)(?:-(\d+))?(?!\d)")
SECTION = re.compile(r"(?<![\w/.-])(README(?:\.md)?|docs/[\w.-]+\.md)(?:\]\([^)]*\))?(?:'s)?,? \"([^\"]+)\"")
LINK = re.compile(r"\]\(([^()\s]+)\)")
OWN_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(OWN_FOLDERS)})/(?:[\w.-]+/)*[\w.-]+\.(?:py|md|sh))(?![\w/])")


# ------------------------------------------------------------------------------- the texts read
def project_files(suffix):
    """The project's files ending in `suffix`, sorted; hidden folders (the virtual environment, git's)
    and caches are not entered."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS]
        found += [Path(folder) / f for f in files if f.endswith(suffix)]
    return sorted(found)


def doc_texts():
    """(path relative to the root, line number, text) of every line that documents something."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if path.is_file():
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                yield path.relative_to(ROOT).as_posix(), n, line
    for path in project_files(".py"):
        yield from python_texts(path)
    for path in project_files(".sh"):
        yield from shell_comments(path)


def shell_comments(path):
    """The comments of one shell script, line by line."""
    rel = path.relative_to(ROOT).as_posix()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = re.search(r"(?:^|\s)(#.*)$", line)
        if m and not line.startswith("#!"):
            yield rel, n, m.group(1)


def python_texts(path, rel=None):
    """The docstrings and comments of one .py file, line by line (`rel`: the name to give it)."""
    rel = rel or path.relative_to(ROOT).as_posix()
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield rel, token.start[0], token.string
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                for n, line in enumerate(first.value.value.splitlines(), first.lineno):
                    yield rel, n, line


# ------------------------------------------------------------------------------- what a file defines
@lru_cache(maxsize=None)
def parsed(path):
    return ast.parse(Path(path).read_text(encoding="utf-8"))


def assigned_names(target):
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for item in target.elts:
            yield from assigned_names(item)


def defined_in(body):
    """{name: node or None} of what a module or class body defines, assigns or imports at its level."""
    names = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(dict.fromkeys(assigned_names(target)))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            names.update(dict.fromkeys(assigned_names(node.target)))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = None
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            inner = list(getattr(node, "body", [])) + list(getattr(node, "orelse", []))
            inner += [n for h in getattr(node, "handlers", []) for n in h.body]
            inner += list(getattr(node, "finalbody", []))
            names.update(defined_in(inner))
    return names


def defines_anywhere(path, name):
    """Whether `path` defines `name` at any depth (a def, a class or an assigned name)."""
    for node in ast.walk(parsed(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(name in assigned_names(t) for t in node.targets):
            return True
        if isinstance(node, ast.AnnAssign) and name in assigned_names(node.target):
            return True
    return False


def module_file(parts):
    """The file of the module `parts` (a list of names) under the root, or None."""
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# ------------------------------------------------------------------------------- the checks
def dotted_problem(name):
    """None when `name` (a dotted name under utils) resolves, else why not."""
    parts = name.split(".")
    n = len(parts)
    while n > 0 and module_file(parts[:n]) is None:
        n -= 1
    if n == 0:
        return "no such module"
    if n == len(parts):
        return None
    module, rest = ".".join(parts[:n]), parts[n:]
    names = defined_in(parsed(module_file(parts[:n])).body)
    owner = module
    for attr in rest:
        if attr not in names:
            return f"{owner} has no `{attr}`"
        node = names[attr]
        if not isinstance(node, ast.ClassDef):
            return None  # an attribute of a function or a value: not followed statically
        names, owner = defined_in(node.body), f"{owner}.{attr}"
        names.update(fields_of(node))
    return None


def fields_of(cls):
    """self.<name> = ... assignments of a class's methods (its instances' attributes)."""
    found = {}
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                    and target.value.id == "self"):
                found[target.attr] = None
    return found


@lru_cache(maxsize=None)
def files_named(name):
    return tuple(p for p in project_files(".py") if p.name == name)


def files_of(ref):
    """The project files a `file.py` reference may mean: the path from the root, else every file of
    that name (a bare name)."""
    direct = ROOT / ref
    if "/" in ref:
        return (direct,) if direct.is_file() else ()
    return files_named(ref)


def file_name_problem(ref, name):
    candidates = files_of(ref)
    if not candidates:
        return f"no file {ref}"
    if any(defines_anywhere(p, name) for p in candidates):
        return None
    return f"{ref} defines no `{name}`"


def file_line_problem(ref, first, last):
    candidates = files_of(ref)
    if not candidates:
        return f"no file {ref}"
    need = int(last or first)
    lines = max(len(p.read_text(encoding="utf-8").splitlines()) for p in candidates)
    return None if need <= lines else f"{ref} has {lines} lines, not {need}"


def problems_in(lines):
    """'file:line: `name`: why' for every reference in `lines` ((file, line, text) triples) that does not
    resolve."""
    found = []
    for where, n, text in lines:
        for m in DOTTED.finditer(text):
            why = dotted_problem(m.group(0))
            if why:
                found.append(f"{where}:{n}: `{m.group(0)}`: {why}")
        for m in FILE_NAME.finditer(text):
            why = file_name_problem(m.group(1), m.group(2))
            if why:
                found.append(f"{where}:{n}: `{m.group(0)}`: {why}")
        for m in FILE_LINE.finditer(text):
            why = file_line_problem(m.group(1), m.group(2), m.group(3))
            if why:
                found.append(f"{where}:{n}: `{m.group(0)}`: {why}")
        for m in OWN_PATH.finditer(text):
            if not (ROOT / m.group(1)).is_file():
                found.append(f"{where}:{n}: `{m.group(1)}`: no such file")
        for m in SECTION.finditer(text):
            why = section_problem(m.group(1), m.group(2))
            if why:
                found.append(f"{where}:{n}: `{m.group(0)}`: {why}")
        if where.endswith(".md"):
            for m in LINK.finditer(text):
                why = link_problem(where, m.group(1))
                if why:
                    found.append(f"{where}:{n}: `{m.group(1)}`: {why}")
    return found


def slug(heading):
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def titles(path):
    """The headings of a markdown file (what anchors point at)."""
    return tuple(h for h, bold in sections(path) if not bold)


def headings(path):
    """The headings of a markdown file and its paragraphs' bold openings."""
    return tuple(h for h, _ in sections(path))


@lru_cache(maxsize=None)
def sections(path):
    if not Path(path).is_file():
        return ()
    found, fenced = [], False
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.append((line.lstrip("#").strip(), False))
        elif not fenced and re.match(r"\*\*[^*]+\*\*", line):
            found.append((line[2:line.index("**", 2)], True))  # a paragraph that opens in bold
    return tuple(found)


def section_problem(doc, title):
    path = ROOT / ("README.md" if doc.startswith("README") else doc)
    if not path.is_file():
        return f"no file {doc}"
    if any(h.lower().startswith(title.lower()) for h in headings(path)):
        return None
    return f"{path.relative_to(ROOT).as_posix()} has no heading \"{title}\""


def link_problem(where, target):
    if re.match(r"[a-z]+:", target):
        return None  # a web address
    file, _, anchor = target.partition("#")
    path = (ROOT / where).parent / file if file else ROOT / where
    if not path.exists():
        return f"no file {file}"
    if anchor and path.suffix == ".md" and anchor not in {slug(h) for h in titles(path.resolve())}:
        return f"{file or where} has no heading with the anchor #{anchor}"
    return None


# ------------------------------------------------------------------------------- the tests
def test_every_name_the_docs_and_docstrings_give_exists():
    problems = problems_in(doc_texts())
    assert not problems, "names in the docs that do not resolve:\n" + "\n".join(problems)


@pytest.mark.parametrize("text, expected", [
    ("see `utils.run.prefix.evaluation_inputs`", "utils.run.prefix has no `evaluation_inputs`"),
    ("utils.nothing_here.x", "utils has no `nothing_here`"),
    ("`prefix.py:no_such_function`", "prefix.py defines no `no_such_function`"),
    ("`no_such_file.py:main`", "no file no_such_file.py"),
    ("utils/run/prefix.py:999999", "has"),
    ("utils/run/prefix.py:1-999999", "not 999999"),
    ("see utils/run/no_such_module.py", "no such file"),
    ("utils.files.identity.NoClass.x", "has no `NoClass`"),
    ('(README, "No such section")', 'README.md has no heading "No such section"'),
    ("[the claims](RESULTS.md#no-such-anchor)", "has no heading with the anchor #no-such-anchor"),
    ("[the claims](NO_SUCH_DOC.md)", "no file NO_SUCH_DOC.md"),
])
def test_a_name_that_does_not_exist_is_named_with_its_file_and_line(text, expected):
    problems = problems_in([("docs/X.md", 7, text)])
    assert len(problems) == 1 and problems[0].startswith("docs/X.md:7: `") and expected in problems[0], problems


@pytest.mark.parametrize("text", [
    "utils.run.prefix", "utils.run.prefix.outputs", "`utils.files.identity.stamp`", "utils.run",
    "utils/run/prefix.py:outputs", "prefix.py:prefix_key", "utils/run/prefix.py:1-10",
    "utils/run/mehl.py", "utils.run.mehl.StepLog.flush", "the end of a sentence: utils.run.mehl.",
    '(README, "Your own zoo")', 'docs/GUARANTEES.md, "Runs are resumable"',
    "[the claims](RESULTS.md#what-holds-across-zoo-builds)", "[a site](https://example.org/x.md)",
])
def test_a_name_that_exists_passes(text):
    assert problems_in([("docs/X.md", 1, text)]) == []


def test_docstrings_and_comments_are_read_but_code_is_not(tmp_path):
    source = tmp_path / "x.py"
    source.write_text('"""Module doc: utils.a"""\n'
                      'x = "utils.b"  # comment: utils.c\n'
                      'def f():\n'
                      '    """utils.d"""\n')
    texts = {(n, t) for _, n, t in python_texts(source, "x.py")}
    assert (1, "Module doc: utils.a") in texts and (2, "# comment: utils.c") in texts and (4, "utils.d") in texts
    assert not any("utils.b" in t for _, t in texts)
