"""The package's layers import only downwards (docs/architecture.md): read from the source, so a new
upward import fails here before it tangles the layers."""
import ast
import os

import uckpt

ROOT = os.path.dirname(uckpt.__file__)
# layer -> the other parts of uckpt it may import (the package root only for __version__)
ALLOWED = {
    "torchsave": set(),
    "errors": set(),
    "regions": {"torchsave"},
    "options": {"errors"},
    "dsformat": {"errors", "regions", "torchsave"},
    "conversion": {"dsformat", "errors", "options", "regions", "torchsave", "__version__"},
    "load": {"dsformat", "errors", "options", "regions", "torchsave"},
    "injob": {"conversion", "dsformat", "errors", "options", "regions", "torchsave"},
    "hfexport": {"conversion", "dsformat", "errors", "options", "regions", "torchsave"},
    "api": {"conversion", "hfexport", "options"},
    "tools": {"api", "conversion", "dsformat", "errors", "hfexport", "load", "options", "regions", "torchsave",
              "__version__"},
    "__init__": {"api", "errors", "load", "injob"},
    "__main__": {"tools"},
}


def _imports():
    """(layer, module file, the top-level part of uckpt it imports) for every relative import."""
    for folder, _, names in os.walk(ROOT):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT).split(os.sep)
            layer = rel[0][:-3] if len(rel) == 1 else rel[0]
            package = rel[:-1]  # the module's package, relative to uckpt
            for node in ast.walk(ast.parse(open(path).read())):
                if not isinstance(node, ast.ImportFrom) or not node.level:
                    continue
                base = package[:len(package) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
                targets = [parts[0]] if parts else [a.name for a in node.names]
                for target in targets:
                    yield layer, os.path.relpath(path, ROOT), target


def test_every_layer_imports_only_the_layers_below_it():
    upward = [(f, t) for layer, f, t in _imports() if t != layer and t not in ALLOWED[layer]]
    assert upward == []


def test_the_check_sees_the_imports():
    seen = {(layer, target) for layer, _, target in _imports()}
    assert ("conversion", "dsformat") in seen and ("regions", "torchsave") in seen and ("tools", "api") in seen
