"""Generate ``docs/api.md`` from the docstrings: ``python -m grace_dl.apidoc > docs/api.md``.

The sources are parsed (``ast``), not imported, so the reference builds without torch,
TensorFlow or Horovod, and is the same on every machine. Every module of the package is
covered except the compressors (``docs/methods.md`` documents them from the registry) and
the framework ops backends (they implement the :class:`~grace_dl.ops.base.Ops` protocol
documented here). A module's public names are its ``__all__`` when it lists them
literally, else every top-level name without a leading underscore; a class shows its
public methods and properties.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
#: Paths (relative to the package) left out of the reference, with the reason.
SKIP = {
    "compressors": "documented from the registry in docs/methods.md",
    "ops/numpy_backend.py": "implements the Ops protocol",
    "torch/ops.py": "implements the Ops protocol",
    "tensorflow/ops.py": "implements the Ops protocol",
    "apidoc.py": "this generator",
}


def _modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every documented module, in a stable order."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel == s or rel.startswith(s + "/") for s in SKIP):
            continue
        if path.name.startswith("_") and path.name != "__init__.py":
            continue
        if "__pycache__" in rel:
            continue
        parts = ["grace_dl"] + rel[:-3].split("/")
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    # a package's own page comes before its modules
    return sorted(out, key=lambda m: m[0].split("."))


def _literal_all(tree: ast.Module) -> list[str] | None:
    """The names listed literally in ``__all__`` (lists joined with ``+`` count), or None."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            names = [c.value for c in ast.walk(node.value)
                     if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            return names
    return None


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef, drop_self: bool) -> str:
    args = fn.args
    if drop_self and args.args and args.args[0].arg in ("self", "cls"):
        args = ast.arguments(posonlyargs=args.posonlyargs, args=args.args[1:], vararg=args.vararg,
                             kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults,
                             kwarg=args.kwarg, defaults=args.defaults)
    text = ast.unparse(args)
    ret = f" -> {ast.unparse(fn.returns)}" if fn.returns is not None else ""
    return f"({text}){ret}"


_SECTIONS = ("Args:", "Arguments:", "Attributes:", "Returns:", "Raises:", "Yields:")
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def format_docstring(text: str) -> str:
    """A Google-style docstring as Markdown: RST roles and double backticks become code
    spans, ``Args:``-like sections become bullet lists, ``::`` blocks stay code blocks."""
    text = _ROLE.sub(_role, text).replace("``", "`")
    out: list[str] = []
    section = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in _SECTIONS:
            section = True
            out += ["", f"**{stripped[:-1]}:**", ""]
            continue
        if section:
            indent = len(line) - len(line.lstrip())
            if not stripped:
                section = False
                out.append("")
            elif indent == 4 and re.match(r"[\w*`.,\s]+( \(.*?\))?: ", stripped):
                name, rest = stripped.split(": ", 1)
                out.append(f"- `{name.strip('`')}`: {rest}")
            elif indent == 4 and stripped.endswith(":") and " " not in stripped[:-1]:
                out.append(f"- `{stripped[:-1]}`:")
            else:
                out.append("  " + stripped)
            continue
        if stripped.endswith("::"):
            line = line[:-1]
        out.append(line)
    return "\n".join(out).strip()


def _doc(node: ast.AST) -> str:
    text = ast.get_docstring(node, clean=True) or "(no docstring)"
    return format_docstring(text.strip())


def _is_property(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id in ("property", "cached_property") for d in fn.decorator_list)


def _class_md(node: ast.ClassDef, module: str) -> list[str]:
    bases = ", ".join(ast.unparse(b) for b in node.bases)
    lines = [f"### class `{module}.{node.name}`" + (f"({bases})" if bases else ""), ""]
    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is not None:
        lines += [f"`{node.name}{_signature(init, True).split(' -> ')[0]}`", ""]
    lines += [_doc(node), ""]
    for item in node.body:
        if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) or item.name.startswith("_"):
            continue
        if _is_property(item):
            lines += [f"- property `{item.name}`: {_doc(item).splitlines()[0]}"]
        else:
            doc = "\n".join(("  " + d) if d else "" for d in _doc(item).splitlines())
            lines += [f"- `{item.name}{_signature(item, True)}`", "", doc, ""]
    if lines[-1] != "":
        lines.append("")
    return lines


def module_markdown(name: str, path: Path) -> list[str]:
    """The Markdown section of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    public = _literal_all(tree)
    lines = [f"## `{name}`", "", _doc(tree) if ast.get_docstring(tree) else "", ""]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            listed = node.name in public if public is not None else not node.name.startswith("_")
            if not listed:
                continue
            if isinstance(node, ast.ClassDef):
                lines += _class_md(node, name)
            else:
                lines += [f"### `{name}.{node.name}{_signature(node, False)}`", "", _doc(node), ""]
    return lines


def api_markdown() -> str:
    """The Markdown text of docs/api.md."""
    modules = _modules()
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python -m grace_dl.apidoc > docs/api.md`; a test fails when",
        "this file and the code disagree. The methods (compressors) and their parameters are in",
        "[methods.md](methods.md). Left out: " + "; ".join(f"`{k}` ({v})" for k, v in SKIP.items()) + ".",
        "",
        "Modules: " + ", ".join(f"[`{n}`](#{n.replace('.', '')})" for n, _ in modules) + ".",
        "",
    ]
    for name, path in modules:
        lines += module_markdown(name, path)
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"


if __name__ == "__main__":
    os.sys.stdout.write(api_markdown())
