"""The stage layering (train/__init__.py): train/ never imports data_gen or eval, they import only its kernel
modules, and no two modules import each other, directly or round a loop. Imports are read with ast, including
those inside functions (a lazy import is still a dependency)."""

import ast
from pathlib import Path

import train

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data_gen", "train", "eval")


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set) -> set:
    """The project modules `path` imports (`from pkg import name` counts as pkg.name when that is a module)."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in STAGES and n in modules)
    return out


def _graph() -> dict:
    files = {_module(p): p for stage in STAGES for p in sorted((REPO / stage).rglob("*.py"))}
    return {m: _imports(p, set(files)) - {m} for m, p in files.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while not scc or scc[-1] != v:
                scc.append(stack.pop())
                on_stack.discard(scc[-1])
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_train_imports_neither_data_gen_nor_eval():
    graph = _graph()
    bad = sorted(f"{m} imports {d}" for m, deps in graph.items() if m.split(".")[0] == "train"
                 for d in deps if d.split(".")[0] != "train")
    assert bad == [], "train/ is the kernel; it must not import the stages built on it:\n" + "\n".join(bad)


def test_other_stages_import_only_the_kernel():
    kernel = {f"train.{name}" for name in train.KERNEL} | {"train"}
    assert all((REPO / "train" / f"{name}.py").is_file() for name in train.KERNEL), "train.KERNEL names a missing module"
    graph = _graph()
    bad = sorted(f"{m} imports {d}" for m, deps in graph.items() if m.split(".")[0] != "train"
                 for d in deps if d.split(".")[0] == "train" and d not in kernel)
    assert bad == [], ("data_gen and eval may import only the kernel listed in train/__init__.py (KERNEL):\n"
                       + "\n".join(bad))


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_detection_sees_lazy_imports():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "data_gen.generate" in _graph()["data_gen.teacher"]  # imported inside teacher.main()
