"""The shape the README promises a reader: code/ppo.py is the lesson, loading and bookkeeping sit beside it."""
import ast
import os

import ppo

from conftest import ROOT

CODE = os.path.join(ROOT, "code")


def parse(name):
    with open(os.path.join(CODE, name), encoding="utf-8") as f:
        return ast.parse(f.read())


def imported(tree):
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def test_imports_run_one_way_and_settings_live_in_ppo_py_alone():
    assert {"loading", "plumbing"} <= imported(parse("ppo.py"))
    assert "ppo" not in imported(parse("loading.py")) | imported(parse("plumbing.py"))
    assert "plumbing" not in imported(parse("loading.py"))  # ppo -> plumbing -> loading, no circle
    for name in ("loading.py", "plumbing.py"):  # no setting of their own: no module constant named like one
        constants = {t.id for n in parse(name).body if isinstance(n, ast.Assign) for t in n.targets
                     if isinstance(t, ast.Name)}
        assert not constants & set(ppo.CONFIG_KEYS), name


def test_the_lesson_keeps_its_length_and_every_line_fits_a_laptop_screen():
    with open(os.path.join(CODE, "ppo.py"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 900
    for name in sorted(os.listdir(CODE)):
        if name.endswith(".py"):
            with open(os.path.join(CODE, name), encoding="utf-8") as f:
                wide = [i + 1 for i, line in enumerate(f.read().splitlines()) if len(line) > 120]
            assert not wide, (name, wide)


def test_functions_and_classes_stay_short():
    for name in sorted(os.listdir(CODE)):
        if not name.endswith(".py") or name == "build_demo.py":
            continue
        longest = 60 if name == "ppo.py" else 80
        for node in ast.walk(parse(name)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.FunctionDef):
                assert size <= longest, (name, node.name, size)
            if isinstance(node, ast.ClassDef):
                assert size <= 150, (name, node.name, size)
