"""The documentation agrees with the code: the Python versions of setup.py are the README's."""

import ast
import re

from packaging.specifiers import SpecifierSet

from conftest import REPO


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
