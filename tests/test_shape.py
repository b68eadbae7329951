"""The shape a newcomer reads: one idea per file, no import cycle, model.py needs torch alone, short functions."""
import ast

import pytest

from conftest import ROOT

FILES = sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in ("tests", ".git")
               and p.name != "__init__.py")


def module_name(path):
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


PROJECT = {module_name(path) for path in FILES}
LONGEST_FUNCTION = 45  # lines; the parser builder, one declaration per flag, is the exception
LONGEST_FILE = 600
# model.py holds the three models the brief keeps in one file (GPT-2 with its loading, LoRA with its variants, the
# student), so it gets a little more room than a module of one idea.
LONGEST_FILE_OF = {"model.py": 680}


def project_imports(path):
    """The project modules a file imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found & PROJECT - {module_name(path)}


def test_the_files_are_the_ones_the_readme_lists():
    readme = (ROOT / "README.md").read_text()
    assert FILES and all(f"`{path.relative_to(ROOT)}`" in readme or f"`{path.name}`" in readme for path in FILES)


def test_model_py_imports_no_project_module():
    assert project_imports(ROOT / "model.py") == set()


def test_no_import_cycle():
    graph = {module_name(path): project_imports(path) for path in FILES}

    def reaches(start, goal, seen=()):
        return any(dep == goal or (dep not in seen and reaches(dep, goal, seen + (dep,))) for dep in graph[start])

    cycles = sorted(module for module in graph if reaches(module, module))
    assert cycles == []


@pytest.mark.parametrize("path", FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_function_is_longer_than_a_screen(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser"
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert long == []


@pytest.mark.parametrize("path", FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_file_is_a_drawer(path):
    assert len(path.read_text().splitlines()) <= LONGEST_FILE_OF.get(str(path.relative_to(ROOT)), LONGEST_FILE)
