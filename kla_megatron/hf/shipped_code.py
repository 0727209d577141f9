"""The code an exported folder ships: the HF model's files and every project module they import, copied from this
checkout at export time into one flat folder with their project imports rewritten to relative ones.

Why flat: transformers' remote-code loader (transformers.dynamic_module_utils) finds a module's local imports with a
regex over `from .NAME import` lines and copies NAME.py from the same folder into its module cache; it follows
neither packages (`from .a.b import`) nor `from . import a`. transformers 4.x copies only the files the modeling
file itself imports (5.x follows imports further), so the modeling file gets a block that names every shipped file.
The `kernels` package is shipped as `kla_kernels*.py`: a file or folder named `kernels` would pose as the Hugging
Face `kernels` library, which transformers probes for.
"""

import ast
from pathlib import Path

import kla_megatron

ROOT = Path(kla_megatron.__file__).resolve().parents[1]
PROJECT_PACKAGES = ("kernels", "kla_megatron")
ENTRY_MODULES = ("kla_megatron.hf.configuration_kla", "kla_megatron.hf.modeling_kla")
MODELING_MODULE = "kla_megatron.hf.modeling_kla"

MANIFEST_HEADER = """

# Every file shipped beside this one. transformers 4.x copies into its module cache only the files that the modeling
# file itself imports (5.x follows imports), so each is named here. The block never runs.
if False:
"""


def shipped_name(module: str) -> str:
    """kernels.kla.chunk -> kla_kernels_kla_chunk; kla_megatron.mixer_math -> mixer_math."""
    parts = module.split(".")
    return "kla_" + "_".join(parts) if parts[0] == "kernels" else parts[-1]


def _source(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _binds(module: str, name: str) -> bool:
    """Whether the module's top level defines or imports `name` (a package's own name wins over its submodule)."""
    for node in ast.parse(_source(module).read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound = [alias.asname or alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound = [node.name]
        elif isinstance(node, ast.Assign):
            bound = [target.id for target in node.targets if isinstance(target, ast.Name)]
        else:
            continue
        if name in bound:
            return True
    return False


def _is_submodule(package: str, name: str) -> bool:
    """Whether `from package import name` imports the submodule package.name (what Python does when the package
    does not bind the name itself)."""
    return _source(f"{package}.{name}").is_file() and not _binds(package, name)


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The module a `from X import ...` statement of `module` names, as an absolute name."""
    if node.level == 0:
        return node.module
    package = module.split(".") if _source(module).name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _project_imports(module: str, tree: ast.Module):
    """(statement, imported module, [(name, alias)], names are modules) for each import of a project module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(alias.name.split(".")[0] in PROJECT_PACKAGES for alias in node.names):
                raise ValueError(f"{module}: `import {node.names[0].name}` cannot be shipped; use `from ... import`")
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            if target.split(".")[0] not in PROJECT_PACKAGES:
                continue
            submodules = [_is_submodule(target, alias.name) for alias in node.names]
            if any(submodules) and not all(submodules):
                raise ValueError(f"{module}: line {node.lineno} imports modules and names from {target} together; "
                                 "split it in two statements")
            yield node, target, [(alias.name, alias.asname) for alias in node.names], all(submodules)


def _rewritten(node, target, names, are_modules) -> str:
    if are_modules:
        return "; ".join(f"from . import {shipped_name(f'{target}.{name}')} as {alias or name}" for name, alias in names)
    listed = ", ".join(name if alias is None else f"{name} as {alias}" for name, alias in names)
    return f"from .{shipped_name(target)} import {listed}"


def shipped_files() -> dict:
    """{file name: source text} of everything an exported folder needs to run the model."""
    sources, queue = {}, list(ENTRY_MODULES)
    while queue:
        module = queue.pop()
        if module in sources:
            continue
        text = _source(module).read_text()
        lines = text.splitlines(keepends=True)
        imports = sorted(_project_imports(module, ast.parse(text)), key=lambda item: item[0].lineno, reverse=True)
        for node, target, names, are_modules in imports:
            queue += [f"{target}.{name}" for name, _ in names] if are_modules else [target]
            first, last = node.lineno - 1, node.end_lineno
            indent = lines[first][: node.col_offset]
            lines[first:last] = [indent + _rewritten(node, target, names, are_modules) + "\n"]
        sources[module] = "".join(lines)
    names = {shipped_name(module) for module in sources}
    if len(names) != len(sources):
        raise ValueError(f"two shipped modules would share a file name: {sorted(sources)}")
    manifest = "".join(f"    from .{shipped_name(m)} import *  # noqa: F401,F403\n"
                       for m in sorted(sources) if m != MODELING_MODULE)
    sources[MODELING_MODULE] += MANIFEST_HEADER + manifest
    return {shipped_name(module) + ".py": text for module, text in sorted(sources.items())}


def write_shipped_files(folder: Path) -> list:
    """Writes the files into `folder` and checks them with the loader's own import scan; returns their names."""
    from transformers.dynamic_module_utils import get_relative_import_files

    files = shipped_files()
    for name, text in files.items():
        (folder / name).write_text(text)
    modeling = folder / (shipped_name(MODELING_MODULE) + ".py")
    found = {Path(path).name for path in get_relative_import_files(str(modeling))} | {modeling.name}
    if found != set(files):
        raise RuntimeError(f"transformers would load {sorted(found)} for the model but the export ships "
                           f"{sorted(files)}: shipped_code.py does not lay them out as the loader reads them")
    return sorted(files)
