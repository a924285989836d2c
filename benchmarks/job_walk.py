"""Follow a job's config through stx's code, statically, and count how the walk moves between modules.

From a root function (default ``run_tracked``, the runner's entry; ``--root train`` for ``stx train``),
calls are followed depth first in source order, in two walks:

* the *config walk* follows every call that receives the config or a part of it: a name bound to
  the config, one of its nodes or values (``cfg.schedule``, ``cfg.images.styles[0]``, a loop over
  one), or a parameter that received one of those;
* the *value walk* also follows every value computed from them (tensors, objectives, files), down
  into the engine's internals.

A walk is the sequence of modules entered by those calls (returns are not counted); a *stay* is a
stretch of consecutive calls in one module, a *climb* a call into a module that sits higher in the
import order (one that imports, directly or not, the module the call leaves), a *return* a stay in
a module the walk had been in before.

    python benchmarks/job_walk.py [--root run_tracked|train] [--show]

Works on any revision of stx (flat or layered): it finds the root by name under ``stx/``.
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stx"
CONFIG_NAMES = {"cfg", "config"}


def module_name(path: Path) -> str:
    return ".".join(("stx", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


class Module:
    def __init__(self, name: str, tree: ast.Module) -> None:
        self.name, self.functions, self.classes, self.imports = name, {}, set(), {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                self.classes.add(node.name)
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self.functions[f"{node.name}.{item.name}"] = item
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stx"):
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("stx"):
                        self.imports[alias.asname or alias.name] = (alias.name, None)


def load() -> dict[str, Module]:
    return {module_name(p): Module(module_name(p), ast.parse(p.read_text())) for p in PACKAGE.rglob("*.py")
            if "assets" not in p.parts and "conf" not in p.parts}


def resolve(modules: dict[str, Module], here: Module, cls: str | None, func: ast.expr) -> tuple[str, str] | None:
    """``(module, function)`` a call's callee names, when it is stx code."""
    def target(module: str, name: str) -> tuple[str, str] | None:
        if module in modules:
            m = modules[module]
            if name in m.functions:
                return module, name
            if name in m.classes:
                return (module, f"{name}.__init__") if f"{name}.__init__" in m.functions else None
            if name in m.imports:  # re-exported
                return target(*m.imports[name]) if m.imports[name][1] else None
        if f"{module}.{name}" in modules:
            return None
        return None

    if isinstance(func, ast.Name):
        if func.id in here.functions or func.id in here.classes:
            return target(here.name, func.id)
        if func.id in here.imports:
            module, name = here.imports[func.id]
            return target(module, name) if name else None
    if isinstance(func, ast.Attribute):
        owner = func.value
        if isinstance(owner, ast.Name):
            if owner.id == "self" and cls and f"{cls}.{func.attr}" in here.functions:
                return here.name, f"{cls}.{func.attr}"
            if owner.id in here.classes:
                return target(here.name, f"{owner.id}.{func.attr}") if f"{owner.id}.{func.attr}" in here.functions else None
            if owner.id in here.imports:
                module, name = here.imports[owner.id]
                if name is None or f"{module}.{name}" in modules:  # a module
                    return target(f"{module}.{name}" if name else module, func.attr)
                resolved = target(module, name)
                if resolved is None and name in modules.get(module, Module(module, ast.Module([], []))).classes:
                    qual = f"{name}.{func.attr}"
                    return (module, qual) if qual in modules[module].functions else None
    return None


def names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def part_of_config(node: ast.AST, tainted: set[str]) -> bool:
    """Whether ``node`` is a tainted name or an attribute or item of one (``cfg.schedule.size``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return isinstance(node, ast.Name) and node.id in tainted


def computed_from(node: ast.AST, tainted: set[str]) -> bool:
    """Whether ``node`` mentions a tainted name anywhere."""
    return bool(names_in(node) & tainted)


def walk(modules: dict[str, Module], module: str, function: str, tainted: set[str], trail: list[str],
         carries=computed_from, stack: tuple[str, ...] = ()) -> None:
    """Append to ``trail`` the module of every function the tainted names reach from ``function``;
    ``carries(expression, tainted)`` says whether an expression carries them on."""
    key = f"{module}:{function}"
    if key in stack or len(stack) > 30:
        return
    node, here = modules[module].functions[function], modules[module]
    cls = function.split(".")[0] if "." in function else None
    tainted = set(tainted)
    for statement in ast.walk(node):  # assignments and loops over tainted values taint their targets (flow-insensitive)
        if isinstance(statement, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and statement.value is not None:
            if carries(statement.value, tainted):
                targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                tainted |= set().union(*(names_in(t) for t in targets))
        elif isinstance(statement, (ast.For, ast.comprehension)) and carries(statement.iter, tainted):
            tainted |= names_in(statement.target)
    trail.append(module)
    calls = sorted((n for n in ast.walk(node) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
    for call in calls:
        arguments = [*call.args, *(k.value for k in call.keywords)]
        if isinstance(call.func, ast.Attribute):
            arguments.append(call.func.value)  # cfg.method(...) and job.method(...) carry it too
        if not any(carries(a, tainted) for a in arguments):
            continue
        callee = resolve(modules, here, cls, call.func)
        if callee is None:
            continue
        callee_node = modules[callee[0]].functions[callee[1]]
        callee_params = [a.arg for a in (*callee_node.args.posonlyargs, *callee_node.args.args, *callee_node.args.kwonlyargs)]
        if callee_params[:1] in (["self"], ["cls"]):
            callee_params = callee_params[1:]
        passed = {p for p, a in zip(callee_params, call.args) if carries(a, tainted)}
        passed |= {k.arg for k in call.keywords if k.arg and carries(k.value, tainted)}
        if isinstance(call.func, ast.Attribute) and carries(call.func.value, tainted):
            passed.add("self")
        walk(modules, *callee, passed, trail, carries, (*stack, key))


def import_rank(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Every module each module imports, directly or not."""
    direct = {m: {i[0] if i[1] is None or f"{i[0]}.{i[1]}" not in modules else f"{i[0]}.{i[1]}"
                  for i in mod.imports.values()} & set(modules) for m, mod in modules.items()}
    closure = {}
    for m in modules:
        seen, todo = set(), [m]
        while todo:
            for n in direct[todo.pop()]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        closure[m] = seen
    return closure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="run_tracked")
    parser.add_argument("--show", action="store_true", help="print the walk's stays")
    args = parser.parse_args()
    modules = load()
    (module, function), = [(m, f) for m, mod in modules.items() for f in mod.functions if f == args.root]
    params = modules[module].functions[function].args.args
    imports = import_rank(modules)
    print(f"root {module}.{function}")
    for name, carries in (("config walk", part_of_config), ("value walk", computed_from)):
        trail: list[str] = []
        walk(modules, module, function, {params[0].arg} | CONFIG_NAMES, trail, carries)
        stays = [m for i, m in enumerate(trail) if i == 0 or trail[i - 1] != m]
        climbs = sum(1 for a, b in zip(stays, stays[1:]) if a in imports[b])
        returns = sum(1 for i, m in enumerate(stays) if m in stays[:i])
        entered = Counter(stays)
        print(f"{name}: {len(stays)} stays in {len(entered)} modules, {climbs} climbs back up, {returns} returns to "
              f"a module already left; entered most: {', '.join(f'{m} {n}' for m, n in entered.most_common(4))}")
        if args.show:
            print("   ", " -> ".join(m.removeprefix("stx.") for m in stays))


if __name__ == "__main__":
    main()
