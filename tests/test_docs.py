"""The documentation agrees with the code and holds nothing of the machine it was written on: the
Python versions of setup.py are the README's, no page names an absolute path of a machine, the
README's options table says what options do (results live in docs/results.md), and
docs/distributed.md names every wrap that fairseq_evomoe/patches.py installs."""

import ast
import shlex
import re

from packaging.specifiers import SpecifierSet

from conftest import REPO, USER_DIR

import fairseq_evomoe.patches as patches

# absolute paths a page may name: the scripts' documented defaults under /tmp, /proc files, and
# the placeholder /path/to/...
ALLOWED_ROOTS = ("/tmp/", "/proc/", "/dev/", "/path/to/")


def setup_keywords() -> dict:
    """The literal keyword arguments of setup.py's setup(...) call, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("python_requires", "classifiers")}


def readme_python_versions() -> set:
    """The Python versions the README's set-up section names ("Python 3.11 (...) or 3.10 (...)")."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"Python (3\.\d+)(?: \([^)]*\))? or (3\.\d+)", text)
    assert m, "the README no longer names its Python versions as 'Python X (...) or Y'"
    return set(m.groups())


def test_setup_py_python_versions_are_the_readmes():
    readme = readme_python_versions()
    assert readme == {"3.10", "3.11"}
    kw = setup_keywords()
    allowed = {f"3.{minor}" for minor in range(6, 20) if f"3.{minor}" in SpecifierSet(kw["python_requires"])}
    assert allowed == readme, f"python_requires={kw['python_requires']!r} allows {sorted(allowed)}; the README says {sorted(readme)}"
    classified = {c.rsplit(" :: ", 1)[1] for c in kw["classifiers"] if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert classified == readme


def absolute_paths(text: str) -> list:
    """Absolute file-system paths in a page (not URLs, ratios such as 1/W, relative paths, or paths
    under a placeholder such as <work-dir>/...)."""
    found = re.findall(r"(?<![\w.~:/\-<>])/[A-Za-z_][\w.\-]*/[\w.\-/]*", text)
    return [p for p in found if not p.startswith(ALLOWED_ROOTS)]


def test_absolute_paths_are_found():
    assert absolute_paths("--work-dir /work/runs/compare and /root/x/y") == ["/work/runs/compare", "/root/x/y"]
    assert absolute_paths("https://arxiv.org/abs/2112.14397, 1/W, E/W, docs/results.md, /tmp/wt2/bin, "
                          "<work-dir>/data/x, ../shared/data, /path/to/fairseq_evomoe") == []


def test_docs_name_no_path_of_the_machine_they_were_written_on():
    pages = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md", REPO / "configs" / "README.md"]
    assert len(pages) > 5
    found = {p.relative_to(REPO).as_posix(): absolute_paths(p.read_text(encoding="utf-8")) for p in pages}
    assert not {page: paths for page, paths in found.items() if paths}


def readme_options_table() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Main options", 1)[1]
    return "\n".join(line for line in section.split("\n\n", 2)[1].splitlines() if line.startswith("|"))


def test_readme_options_table_says_what_options_do_not_how_they_scored():
    table = readme_options_table()
    assert "`--dts-sparsity`" in table and "`--moe-gate`" in table
    results = re.findall(r"perplexity|BLEU|\bseeds?\b|ahead of|behind|\d+(?:\.\d+)?\s*x ", table)
    assert not results, f"measured results in the README's options table ({results}); they belong in docs/results.md"
    assert "docs/results.md" in table  # where they are instead


def patched_names() -> list:
    """What patches.py says it patches: the torch/fairseq names in backticks of its numbered items."""
    items = re.findall(r"^\d+\. (.*?)(?=^\d+\. |^\S|\Z)", patches.__doc__, flags=re.M | re.S)
    return [name for item in items for name in re.findall(r"`((?:torch|fairseq|\w+Optimizer)\.[\w.]+)`", item)]


def installed_wraps() -> set:
    """The attributes `install_at_import` and `install_for_expert_parallelism` replace
    (`X.attr = ...`), and the functions they call, from their source."""
    tree = ast.parse(open(patches.__file__, encoding="utf-8").read())
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("install_")]
    assert len(fns) == 2, [f.name for f in fns]
    assigned = {t.attr for fn in fns for n in ast.walk(fn) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Attribute)}
    called = {n.func.id for fn in fns for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return assigned | called


def test_distributed_md_names_every_patch():
    names = patched_names()
    assert len(names) == 8 and "AMPOptimizer.step" in names and "fairseq.trainer.Trainer.__init__" in names, names
    last = {n.rsplit(".", 1)[1] for n in names}
    assert installed_wraps() - {"getattr", "allow_fairseq_checkpoints"} <= last, "patches.py installs something its docstring does not list"
    page = (REPO / "docs" / "distributed.md").read_text(encoding="utf-8")
    section = page.split("## What is patched", 1)[1].split("\n## ", 1)[0]
    assert [n for n in names if f"`{n}`" not in section] == []


def documented_commands() -> list:
    """(page, argv) of every fairseq-train / -generate / -eval-lm command in the pages' shell blocks,
    continuation lines joined and trailing comments dropped."""
    pages = [REPO / "README.md", REPO / "configs" / "README.md"] + sorted((REPO / "docs").glob("*.md"))
    found = []
    for page in pages:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.split(" #")[0].strip()
                if re.match(r"fairseq-(train|generate|eval-lm) ", line):
                    found.append((page.relative_to(REPO).as_posix(), shlex.split(line)))
    return found


def test_documented_fairseq_commands_parse():
    """Every fairseq-train, fairseq-generate and fairseq-eval-lm command the pages show is accepted by
    fairseq's own parser with the plugin loaded: no option is misspelt, removed or given a bad choice."""
    from fairseq import options

    parsers = {"fairseq-train": options.get_training_parser, "fairseq-generate": options.get_generation_parser,
               "fairseq-eval-lm": options.get_eval_lm_parser}
    commands = documented_commands()
    assert {argv[0] for _, argv in commands} == set(parsers), [argv[0] for _, argv in commands]
    # the placeholders a page explains next to its command, with one of their values
    placeholders = {"$E": "8", "$SPARSITY": "threshold"}
    failed = []
    for page, argv in commands:
        args = [USER_DIR if a == "fairseq_evomoe" else placeholders.get(a, a) for a in argv[1:]]
        assert not [a for a in args if a.startswith("$")], f"{page}: a placeholder this test does not know: {args}"
        try:
            options.parse_args_and_arch(parsers[argv[0]](), input_args=args)
        except SystemExit:
            failed.append(f"{page}: {' '.join(argv)}")
    assert not failed, "commands fairseq's parser rejects:\n" + "\n".join(failed)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.*)$", text, flags=re.M):
        a = github_anchor(heading)
        found.add(a if a not in seen else f"{a}-{seen[a]}")
        seen[a] = seen.get(a, 0) + 1
    return found


def test_github_anchor():
    assert github_anchor("The authors' configuration: `configs/gate/evomoe_authors.yaml`") == \
        "the-authors-configuration-configsgateevomoe_authorsyaml"
    assert github_anchor("The defaults (since 2026-12-07)") == "the-defaults-since-2026-12-07"


def test_relative_links_and_anchors_resolve():
    pages = ([REPO / "README.md", REPO / "configs" / "README.md"] + sorted((REPO / "docs").glob("*.md"))
             + sorted((REPO / "benchmarks").glob("**/*.md")))
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
