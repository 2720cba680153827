"""The import graph of vlm_core's modules has no cycle (imports inside functions count), and
`inputs` never imports `checkpoint` or `models`."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "vlm_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                # `from pkg import a, b`: each name that is a module, else the package itself
                candidates = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                while c and c not in modules:          # the innermost module that exists
                    c = c.rpartition(".")[0]
                if c and c != name and c.startswith("vlm_core"):
                    graph[name].add(c)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_the_module_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def within(module: str, packages) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(module == p or module.startswith(p + ".") for p in packages)


def below(graph, packages, forbidden) -> dict[str, list[str]]:
    """Modules of `packages` that import a module of `forbidden`."""
    bad = {m: sorted(t for t in ts if within(t, forbidden)) for m, ts in graph.items() if within(m, packages)}
    return {m: ts for m, ts in bad.items() if ts}


def test_inputs_import_neither_checkpoint_nor_models():
    graph = import_graph()
    assert below(graph, "vlm_core.inputs", ("vlm_core.checkpoint", "vlm_core.models", "vlm_core.families")) == {}


def test_families_sit_above_models_inputs_and_checkpoint():
    """Model knowledge flows one way: families use the generic layers, never the reverse, and the
    engine types against the model protocol, not a family."""
    graph = import_graph()
    generic = ("vlm_core.models", "vlm_core.inputs", "vlm_core.checkpoint", "vlm_core.config", "vlm_core.engine",
               "vlm_core.quant")
    assert below(graph, generic, "vlm_core.families") == {}
    assert {"vlm_core.families.llava", "vlm_core.families.vila"} <= set(graph["vlm_core.families"])


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


DEPLOYMENTS = ROOT.parent / "deployments"
SERVING_LAYER = ("serving", "preparation", "answers", "errors", "protocol/__init__", "protocol/requests",
                 "protocol/responses")
RAY_INTERNALS = ("_private", "_to_object_ref", "servable_object", "_replica_queue_len_cache", "_probe_queue_lens",
                 "_deployment_id", "internal_request_id")


def names_in(path: Path) -> set[str]:
    """Module names imported and attribute names used in a file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
    return out


def test_the_serving_layer_runs_without_ray():
    """Its modules name no Ray module, and importing it loads none (imports of what it imports count)."""
    import subprocess
    import sys

    for name in SERVING_LAYER:
        used = names_in(DEPLOYMENTS / f"{name}.py")
        assert not [m for m in used if m == "ray" or m.startswith("ray.")], name
    code = ("import sys, deployments.serving; bad = sorted(m for m in sys.modules if m == 'ray' or "
            "m.startswith('ray.')); print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_serve_internals_are_named_in_serve_compat_only():
    for path in sorted(DEPLOYMENTS.rglob("*.py")):
        if path.name == "serve_compat.py":
            continue
        used = names_in(path)
        found = sorted(n for n in used if any(n == i or ("." in n and i in n.split(".")) for i in RAY_INTERNALS))
        assert not found, f"{path.name} uses Serve internals {found}"


def test_every_family_processor_meets_the_processor_protocol(tiny_dir, tmp_path):
    from orig_layout import TOWER_ID, write_checkpoint, write_tower
    from vlm_core.families import load_processor
    from vlm_core.inputs.processor import Processor
    from vlm_core.tiny_vila import build_tiny_vila

    orig = write_checkpoint(tmp_path / "orig")
    write_tower(orig / TOWER_ID.split("/")[-1])
    for folder in (tiny_dir, build_tiny_vila(tmp_path / "nvila", "nvila"), orig):
        assert isinstance(load_processor(folder), Processor), folder


def test_the_scheduler_and_the_routers_load_no_kernel():
    """Block bookkeeping is pure Python: the scheduler, and the router in every Ingress, import
    neither the attention kernels nor Triton."""
    import subprocess
    import sys

    code = ("import sys, vlm_core.engine.scheduler, vlm_core.engine.blocks, deployments.routing; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('kernels', 'triton')); print(bad); "
            "sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
