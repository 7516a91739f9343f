"""A small, honest mutation run over the pure core: plan.py, permutation.py, lr.py, duration.py.

Each mutant changes one AST node inside one function (an operator, a comparison, an `and`/`or`, a `not`, an
int or bool constant; nothing inside a `raise`, an f-string, an annotation or a default value), compiles the
module, and swaps only that function's code object in (`func.__code__`), so every module that imported the
function sees the mutant. Each mutant runs in a forked child (torch, pytest and the test modules are imported
once, in the parent) on the fast unit tests of its module with `-x`; a failure or a timeout kills it.

    python benchmarks/mutation.py                    # every module, JSON summary on stdout
    python benchmarks/mutation.py --module lr --jobs 2 --max-examples 10
    python benchmarks/mutation.py --every 3        # a fixed third of the mutants (a loaded 2-core machine)
    python benchmarks/mutation.py --rerun old.json # only the survivors of an earlier run

Hypothesis tests run with `--max-examples` examples (default 10) to keep the run short; tests that set their
own `@settings(max_examples=...)` keep theirs.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import inspect
import json
import os
import signal
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = {  # module → the fast unit tests that should kill its mutants (test_sampler.py: --with-sampler)
    "plan": ["tests/unit/test_plan.py", "tests/unit/test_core_mutants.py"],
    "permutation": ["tests/unit/test_permutation.py", "tests/unit/test_core_mutants.py"],
    "lr": ["tests/unit/test_lr.py"],
    "duration": ["tests/unit/test_plan.py", "tests/unit/test_lr.py"],
}
DISPLAY = {"__repr__", "__str__", "_shown"}  # text for messages only: not mutated
SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
        ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
        ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitOr,
        ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
        ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
        ast.And: ast.Or, ast.Or: ast.And}


def _untouchable(tree: ast.AST) -> set[int]:
    """ids of nodes inside raise statements, f-strings, docstrings and annotations."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Raise, ast.JoinedStr)):
            skip.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.arguments):  # defaults live on the function object, not in its code
            skip.update(id(n) for d in [*node.defaults, *node.kw_defaults] if d is not None for n in ast.walk(d))
        if isinstance(node, ast.arg) and node.annotation is not None:  # annotations are never evaluated here
            skip.update(id(n) for n in ast.walk(node.annotation))
        if isinstance(node, (ast.FunctionDef, ast.AnnAssign)):
            for annotation in (getattr(node, "returns", None), getattr(node, "annotation", None)):
                if annotation is not None:
                    skip.update(id(n) for n in ast.walk(annotation))
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) and ast.get_docstring(node) is not None:
            skip.update(id(n) for n in ast.walk(node.body[0]))
    return skip


def _sites(func: ast.FunctionDef, skip: set[int]) -> list[tuple[ast.AST, str, int]]:
    """(node, what changes, which operand) for every mutation of a function body."""
    out = []
    for node in ast.walk(func):
        if id(node) in skip or node is func:
            continue
        if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAP:
            out.append((node, f"{type(node.op).__name__} -> {SWAP[type(node.op)].__name__}", 0))
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in SWAP:
                    out.append((node, f"{type(op).__name__} -> {SWAP[type(op)].__name__}", i))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            out.append((node, "drop not", 0))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, bool):
            out.append((node, f"{node.value!r} -> {(not node.value) if type(node.value) is bool else node.value + 1!r}",
                        0))
    return out


def _apply(node: ast.AST, index: int) -> None:
    if isinstance(node, (ast.BinOp, ast.BoolOp)):
        node.op = SWAP[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops[index] = SWAP[type(node.ops[index])]()
    elif isinstance(node, ast.Constant):
        node.value = (not node.value) if type(node.value) is bool else node.value + 1


class _DropNot(ast.NodeTransformer):
    def __init__(self, target: ast.AST) -> None:
        self.target = target

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        return node.operand if node is self.target else self.generic_visit(node)


def _functions(module: types.ModuleType, tree: ast.Module) -> list[tuple[str, ast.FunctionDef, types.FunctionType]]:
    """(qualified name, AST, live function) of module-level functions and methods defined in the module."""
    out = []
    for node in tree.body:
        holders = [(node.name, node, getattr(module, node.name, None))] if isinstance(node, ast.FunctionDef) else []
        if isinstance(node, ast.ClassDef):
            cls = getattr(module, node.name, None)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and cls is not None:
                    attr = inspect.getattr_static(cls, item.name, None)
                    attr = getattr(attr, "fget", None) or getattr(attr, "__func__", None) or attr
                    holders.append((f"{node.name}.{item.name}", item, attr))
        out += [(name, fn, live) for name, fn, live in holders
                if isinstance(live, types.FunctionType) and fn.name not in DISPLAY]
    return out


def _code_of(code: types.CodeType, name: str, line: int) -> types.CodeType | None:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_name == name and const.co_firstlineno == line:
                return const
            found = _code_of(const, name, line)
            if found is not None:
                return found
    return None


def _mutants(module_name: str):
    module = importlib.import_module(f"ddp_toolkit.{module_name}")
    path = Path(module.__file__)
    tree = ast.parse(path.read_text())
    for qualname, fn_node, live in _functions(module, tree):
        index_of = {id(n): i for i, n in enumerate(ast.walk(tree))}
        for site, what, operand in _sites(fn_node, _untouchable(tree)):
            mutated = copy.deepcopy(tree)
            target = list(ast.walk(mutated))[index_of[id(site)]]
            if what == "drop not":
                mutated = _DropNot(target).visit(mutated)
            else:
                _apply(target, operand)
            ast.fix_missing_locations(mutated)
            code = _code_of(compile(mutated, str(path), "exec"), fn_node.name, fn_node.lineno
                            if not fn_node.decorator_list else fn_node.decorator_list[0].lineno)
            if code is None or code.co_freevars != live.__code__.co_freevars:
                continue
            yield {"module": module_name, "function": qualname, "line": site.lineno, "mutation": what,
                   "source": ast.get_source_segment(path.read_text(), site) or ""}, live, code


def _run_child(live: types.FunctionType, code: types.CodeType, tests: list[str], max_examples: int) -> None:
    import pytest
    from hypothesis import settings

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    settings.register_profile("mutation", max_examples=max_examples, deadline=None)
    settings.load_profile("mutation")
    live.__code__ = code
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os._exit(int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=sorted(TESTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--max-examples", type=int, default=10)
    parser.add_argument("--every", type=int, default=1, help="run every N-th mutant only (a fixed sample)")
    parser.add_argument("--rerun", type=Path, help="only the survivors listed in this earlier JSON output")
    parser.add_argument("--with-sampler", action="store_true", help="add tests/unit/test_sampler.py everywhere")
    args = parser.parse_args()
    if args.with_sampler:
        for files in TESTS.values():
            files.append("tests/unit/test_sampler.py")
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    import pytest  # noqa: F401  (imported once, before the forks)
    import torch

    torch.set_num_threads(1)
    for files in TESTS.values():  # test modules too: the children's collection finds them in sys.modules
        for file in files:
            importlib.import_module(file.removesuffix(".py").replace("/", "."))
    modules = args.module or sorted(TESTS)
    queue = [(m, *rest) for m in modules for rest in _mutants(m)][::args.every]
    if args.rerun:
        def key(r: dict) -> tuple:
            return r["module"], r["function"], r["line"], r["mutation"]

        keys = {key(r) for r in json.loads(args.rerun.read_text())["survivors"]}
        queue = [q for q in queue if key(q[1]) in keys]
    running: dict[int, tuple[dict, float]] = {}
    results, start = [], time.time()
    while queue or running:
        while queue and len(running) < args.jobs:
            module_name, info, live, code = queue.pop(0)
            pid = os.fork()
            if pid == 0:
                _run_child(live, code, TESTS[module_name], args.max_examples)
            running[pid] = (info, time.time())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for pid, (info, began) in list(running.items()):
                if time.time() - began > args.timeout:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    results.append({**info, "outcome": "killed (timeout)"})
                    del running[pid]
            time.sleep(0.05)
            continue
        info, _ = running.pop(pid)
        code_ = os.waitstatus_to_exitcode(status)
        results.append({**info, "outcome": "survived" if code_ == 0 else "killed"})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        print(f"{len(results)}/{len(results) + len(queue) + len(running)} {info['module']}.{info['function']}:"
              f"{info['line']} {info['mutation']}: {results[-1]['outcome']}", file=sys.stderr, flush=True)
    killed = sum(r["outcome"] != "survived" for r in results)
    print(json.dumps({"mutants": len(results), "killed": killed,
                      "score": round(killed / len(results), 4) if results else None,
                      "seconds": round(time.time() - start, 1),
                      "survivors": sorted((r for r in results if r["outcome"] == "survived"),
                                          key=lambda r: (r["module"], r["line"]))}, indent=1))


if __name__ == "__main__":
    main()
