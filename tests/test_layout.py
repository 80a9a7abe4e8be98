"""The package's module layout (issue #18): kaki modules import each other at module level, so the
import graph is visible and has no cycles; and the core runs with none of the extras installed.

Function-level imports of kaki modules hide cycles (and made six subsystems import `kaki.llm`
lazily). The CLI may stay lazy (start-up time); what is left elsewhere is listed below with its
reason, so a new one fails here instead of accumulating.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "kaki"
ROOT = SRC.parent

# Function-level imports of kaki modules still allowed, by file: module -> why.
LAZY_ALLOWED: dict[str, dict[str, str]] = {
    # jinja2 takes ~0.1 s to import and only a tokenizer's own chat_template needs it; chat_format is
    # imported by `kaki index query`, which starts without torch.
    "kaki/chat_format.py": {"kaki.jinja_sandbox": "start-up time"},
    # kaki.retrieval imports numpy (the retrieval extra), which the serve extra does not bring.
    "kaki/serve/openai_api.py": {"kaki.retrieval": "needs the retrieval extra"},
}
# Import cycles (counting function-level imports too) still present, each listed whole.
KNOWN_CYCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _kaki_imports(tree: ast.AST, modules: dict[str, Path]):
    """(imported kaki module, inside a function?) for every import statement in `tree`."""
    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").split(".")[0] == "kaki":
                # `from kaki.x import y` imports kaki.x.y when y is a module.
                names = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in modules else child.module
                         for a in child.names]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names if a.name.split(".")[0] == "kaki"]
            for name in names:
                yield name, inner
            yield from visit(child, inner)
    yield from visit(tree, False)


def _function_level_imports() -> set[tuple[str, str]]:
    """(file, kaki module) for every kaki import inside a function, outside the CLI."""
    modules = _modules()
    found = set()
    for name, path in sorted(modules.items()):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("kaki/cli/"):
            continue  # the CLI stays lazy: `kaki --help` must not import torch
        for imported, nested in _kaki_imports(ast.parse(path.read_text()), modules):
            if nested:
                found.add((rel, imported))
    return found


def test_no_function_level_imports_of_kaki_modules_outside_the_cli():
    found = [f"{rel}: {m}" for rel, m in _function_level_imports() if m not in LAZY_ALLOWED.get(rel, {})]
    assert not found, "import these at module level (or list them in LAZY_ALLOWED with why): " + ", ".join(
        sorted(found))


def test_the_allowlists_hold_only_what_is_still_there():
    """An exception that is gone comes off the lists, so they shrink as the code does."""
    found = _function_level_imports()
    stale = [f"{rel}: {m}" for rel, ms in LAZY_ALLOWED.items() for m in ms if (rel, m) not in found]
    assert not stale, "no longer imported inside a function; remove from LAZY_ALLOWED: " + ", ".join(stale)
    cycles = _cycles()
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"these cycles changed or are gone; update KNOWN_CYCLES: {gone}"


def _cycles() -> list[set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for imported, _ in _kaki_imports(ast.parse(path.read_text()), modules):
            parts = imported.split(".")
            # Importing kaki.a.b runs kaki.a's __init__ too.
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return _strongly_connected(graph)


def test_the_import_graph_has_no_cycles_but_the_listed_ones():
    cycles = _cycles()
    # The cycles issue #18 names are gone.
    for a, b in [("kaki.llm", "kaki.adept"), ("kaki.llm", "kaki.quant"),
                 ("kaki.adept.release", "kaki.adept.convert"), ("kaki.train.loop", "kaki.train.classify_loop"),
                 ("kaki.train.loop", "kaki.train.memory")]:
        assert not any(a in c and b in c for c in cycles), f"{a} and {b} import each other again"
    unknown = [sorted(c) for c in cycles if not any(c <= known for known in KNOWN_CYCLES)]
    assert not unknown, f"new import cycles: {unknown}"


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively; components of more than one module."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a planted cycle is found."""
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


# ----------------------------------------------------------------------------- no extras

# Every extra's packages (pyproject.toml's optional-dependencies), numpy among them: `pip install
# kaki` installs none of them.
EXTRAS = ["numpy", "faiss", "transformers", "fastapi", "uvicorn", "prometheus_client", "peft", "wandb",
          "bitsandbytes", "openai", "httpx", "playwright", "pexpect", "sentence_transformers", "google.protobuf"]

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {EXTRAS!r}

    class NoExtras(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: an extra)", name=name)
            return None

    sys.meta_path.insert(0, NoExtras())
    for b in BLOCKED:
        assert b not in sys.modules, b
""")


def _run_without_extras(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_the_blocker_blocks():
    r = _run_without_extras("import numpy")
    assert r.returncode != 0 and "blocked: an extra" in r.stderr


def test_core_modules_import_and_kaki_train_help_runs_without_the_extras():
    r = _run_without_extras("""
        import kaki.train.data, kaki.llm, kaki.engine, kaki.chat.shell, kaki.moderation, kaki.evaluate
        import kaki.classify, kaki.loading, kaki.saving, kaki.device, kaki.adept.convert, kaki.quant.convert
        import kaki.train.run, kaki.lora  # the whole training stack, LoRA included
        from kaki.cli import main
        try:
            main(["train", "--help"])
        except SystemExit as e:
            assert e.code == 0, e.code
        else:
            raise AssertionError("--help did not exit")
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--data" in r.stdout


def test_kaki_generate_runs_without_the_extras():
    r = _run_without_extras("""
        import sys
        from kaki.cli import main
        sys.exit(main(["generate", "--model", "models/kaki-tiny", "--device", "cpu", "--max-new-tokens", "4",
                       "--no-prompt", "human: Hello\\\\n\\\\nadept:"]))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()
