"""The layer rules of monitor/, checked on the source text: every `import` and `from ... import`
of every module under monitor/ is read with ast (nothing is imported, so bcc need not be
installed) and held against the rules below. A failure names the module, the line and the
import that breaks a rule.

Rules (docs/architecture.md): model/ imports nothing internal; only kernel/ imports bcc;
policy/ imports nothing from sessions/enforce/observe/service/cli; observe/ never imports
enforce/; nothing outside cli/ imports cli/; config/ imports nothing from sessions/enforce/
observe/service/cli/kernel.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MONITOR = ROOT / "monitor"


@dataclass(frozen=True)
class Rule:
    """Modules of package `where` (None: every package but `exempt`) must not import any
    name under one of `forbidden` (dotted prefixes) unless it is under one of `unless`."""

    name: str
    where: str | None
    forbidden: tuple[str, ...]
    exempt: str | None = None
    unless: tuple[str, ...] = ()

    def applies_to(self, package: str) -> bool:
        if self.where is None:
            return package != self.exempt
        return package == self.where


def _under(prefixes: tuple[str, ...], name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


_STAGES = ("sessions", "enforce", "observe", "service", "cli")

RULES = (
    Rule("model imports nothing internal", "model", ("monitor",), unless=("monitor.model",)),
    Rule("only kernel imports bcc", None, ("bcc",), exempt="kernel"),
    Rule("policy imports no later stage", "policy", tuple(f"monitor.{s}" for s in _STAGES)),
    Rule("observe never imports enforce", "observe", ("monitor.enforce",)),
    Rule("nothing outside cli imports cli", None, ("monitor.cli",), exempt="cli"),
    Rule("config imports no later stage nor kernel", "config",
         tuple(f"monitor.{s}" for s in (*_STAGES, "kernel"))),
)

# Imports that break a rule in today's tree, while the engineers who own those files move
# them: (rule name, module, imported name). Each entry is a known breach, not a permission;
# the lead empties this list at merge. Empty now: no rule is broken.
ALLOWED: frozenset[tuple[str, str, str]] = frozenset()


def imported_names(module: str, source: str) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) of every import in `source`, the text of `module`
    (dotted, e.g. monitor.policy.engine); relative imports are resolved against it."""
    tree = ast.parse(source, filename=module)
    package = module.split(".")[:-1]  # for a package's __init__ too: the package itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            stem = ".".join([*base, *([node.module] if node.module else [])])
            # each name is a submodule of stem or an attribute of it: under stem either way,
            # so `from monitor import cli` is seen as monitor.cli
            for alias in node.names:
                yield node.lineno, f"{stem}.{alias.name}"


def breaches(module: str, source: str) -> list[tuple[str, str, int, str]]:
    """(rule, module, line, import) for each import of `module` that breaks a rule."""
    parts = module.split(".")
    if parts[0] != "monitor":
        return []
    package = parts[1] if len(parts) > 2 else ""  # monitor/__init__.py: no stage of its own
    found = []
    for line, name in imported_names(module, source):
        for rule in RULES:
            if (rule.applies_to(package) and _under(rule.forbidden, name)
                    and not _under(rule.unless, name)):
                found.append((rule.name, module, line, name))
    return found


def monitor_modules() -> Iterator[tuple[str, str]]:
    """(dotted name, source) of every .py file under monitor/."""
    for path in sorted(MONITOR.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        yield ".".join(rel.parts), path.read_text()


def test_every_module_keeps_the_layer_rules() -> None:
    found = [b for mod, src in monitor_modules() for b in breaches(mod, src)
             if (b[0], b[1], b[3]) not in ALLOWED]
    assert not found, "layer rules broken:\n" + "\n".join(
        f"  {mod.replace('.', '/')}.py:{line} imports {name} ({rule})"
        for rule, mod, line, name in found)


def test_the_allow_list_names_only_real_breaches() -> None:
    """An allowed breach that is fixed must leave the list, so the list only shrinks."""
    real = {(b[0], b[1], b[3]) for mod, src in monitor_modules() for b in breaches(mod, src)}
    assert ALLOWED <= real, f"fixed, remove from ALLOWED: {sorted(ALLOWED - real)}"


def test_the_walk_sees_every_stage() -> None:
    packages = {mod.split(".")[1] for mod, _ in monitor_modules() if mod.count(".") >= 2}
    assert {"model", "kernel", "config", "policy", "sessions", "enforce", "observe",
            "service", "cli"} <= packages


def rule_names(module: str, source: str) -> set[str]:
    return {b[0] for b in breaches(module, source)}


# (module, its source, the rule it breaks): every form an import can take
FORBIDDEN = [
    ("monitor.model.events", "import monitor.policy.rules\n", "model imports nothing internal"),
    ("monitor.model.events", "from monitor.config import settings\n",
     "model imports nothing internal"),
    ("monitor.model.events", "from ..policy import rules\n", "model imports nothing internal"),
    ("monitor.observe.metrics", "def f():\n    from monitor.enforce.judge import Judge\n",
     "observe never imports enforce"),
    ("monitor.observe.metrics", "from ..enforce.judge import Judge\n",
     "observe never imports enforce"),
    ("monitor.sessions.tracker", "from bcc import BPF\n", "only kernel imports bcc"),
    ("monitor.__init__", "import bcc\n", "only kernel imports bcc"),
    ("monitor.policy.engine", "from monitor.sessions.tracker import T\n",
     "policy imports no later stage"),
    ("monitor.service.daemon", "import monitor.cli.main\n", "nothing outside cli imports cli"),
    ("monitor.service.daemon", "from monitor import cli\n", "nothing outside cli imports cli"),
    ("monitor.config.settings", "from monitor.kernel import loader\n",
     "config imports no later stage nor kernel"),
    ("monitor.config.__init__", "from ..enforce import judge\n",
     "config imports no later stage nor kernel"),
]

# (module, its source): imports every rule lets through
ALLOWED_IMPORTS = [
    ("monitor.model.events",
     "import ctypes\nfrom . import cmdline\nfrom monitor.model.address import fold\n"),
    ("monitor.kernel.loader", "from bcc import BPF\n"),
    ("monitor.cli.main", "from monitor.cli import top\n"),
    ("monitor.observe.metrics", "from monitor.model.events import E\n"),
    ("monitor.policy.engine", "from monitor.config.regex import R\n"),
    ("monitor.model.events", "import monitorish\n"),  # only looks like the package
]


def test_the_checker_catches_a_forbidden_import_in_each_form() -> None:
    for module, source, rule in FORBIDDEN:
        assert rule_names(module, source) == {rule}, (module, source)


def test_the_checker_lets_allowed_imports_through() -> None:
    for module, source in ALLOWED_IMPORTS:
        assert rule_names(module, source) == set(), (module, source)
