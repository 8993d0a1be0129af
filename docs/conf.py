"""Sphinx configuration for the trio_sessions documentation.

Built by ``nox -s docs`` with ``-n -W --keep-going`` (nitpicky, warnings are errors), as
html and as doctest. STYLE.md section 10 describes the choices.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

import trio_sessions

DOCS = Path(__file__).parent
ROOT = DOCS.parent

# -- project -----------------------------------------------------------------------------

project = "trio-sessions"
author = "the trio-sessions authors"
copyright = f"{dt.date.today().year}, {author}"
release = trio_sessions.__version__
version = ".".join(release.split(".")[:2])

# -- extensions --------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinxcontrib_trio",  # marks async functions, async context managers, ... in signatures
    "myst_parser",  # the Markdown pages (emulator.md, and results pages such as benchmarks.md)
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples"]
default_role = "obj"
# Short names such as `SessionManager.stop` resolve in every page, as in the docstrings.
rst_prolog = ".. currentmodule:: trio_sessions\n"
nitpicky = True
pygments_style = "sphinx"
pygments_dark_style = "monokai"

# -- cross-references to other projects ----------------------------------------------------
#
# STYLE.md wants intersphinx links to Python, Trio, trio-asyncio and attrs. This build
# must also work where only the package index is reachable (CI here, offline laptops),
# and intersphinx fetches each project's objects.inv over the network at build time: an
# unreachable inventory is a warning, so with -W the build would fail. So the mapping
# stays empty and external names render as plain literals instead of links. To get the
# links back where the network allows, set TRIO_SESSIONS_DOCS_INTERSPHINX=1 (not used by
# nox or CI).
#
# Nitpicky mode still checks every reference to trio_sessions' own objects; references to
# other projects' objects (in signatures and in `backquoted` names) are listed below as
# known-unresolvable, by module prefix, so a typo in one of *our* names still fails.

_INVENTORIES = {
    "python": ("https://docs.python.org/3", None),
    "trio": ("https://trio.readthedocs.io/en/stable", None),
    "trio-asyncio": ("https://trio-asyncio.readthedocs.io/en/latest", None),
    "attrs": ("https://www.attrs.org/en/stable", None),
}
intersphinx_mapping = _INVENTORIES if os.environ.get("TRIO_SESSIONS_DOCS_INTERSPHINX") else {}

_EXTERNAL_MODULES = (
    "abc",
    "asyncio",
    "attr",
    "attrs",
    "azure",
    "collections",
    "contextlib",
    "datetime",
    "dt",
    "enum",
    "json",
    "math",
    "pytest",
    "random",
    "trio",
    "trio_asyncio",
    "types",
    "typing",
)
_BUILTINS = (
    "Any",
    "AsyncIterator",
    "Awaitable",
    "BaseException",
    "Callable",
    "Exception",
    "ExceptionGroup",
    "Iterable",
    "KeyboardInterrupt",
    "Mapping",
    "None",
    "NotImplementedError",
    "RuntimeError",
    "Sequence",
    "StopAsyncIteration",
    "TypeError",
    "ValueError",
    "bool",
    "bytearray",
    "bytes",
    "dict",
    "float",
    "int",
    "list",
    "memoryview",
    "object",
    "str",
    "tuple",
    "type",
)
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL_MODULES)})\..*"),
    (r"py:.*", rf"({'|'.join(_BUILTINS)})"),
    # Names from the Backend seam and private modules that appear in signatures; the
    # seam is documented in prose (design page), not as public API.
    (
        r"py:.*",
        r"(trio_sessions\.)?(backends\._abc\.|_messages\.|backends\._azure\.)?"
        r"(Backend|SessionLink|EntityPath|AzureSessionLink|parse_connection_string)",
    ),
    (r"py:.*", r"(trio_sessions\.)?(_actor\.)?(SessionHandler|ErrorHandler|P|T)"),
    (r"py:.*", r"TracebackType|Emulator|Settlement"),
]

# -- autodoc and napoleon --------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- doctest -----------------------------------------------------------------------------------

doctest_global_setup = """
import attrs
import trio_sessions
from trio_sessions import *
"""

# -- Markdown (MyST) -----------------------------------------------------------------------------

myst_heading_anchors = 3

# -- pages that other branches may add ------------------------------------------------------------
#
# benchmarks and reliability are Markdown pages written from the results files. Those
# that exist are put in a "Results" toctree in index.rst (at the marker comment), so
# the build passes before and after they are added; a plain toctree entry for a missing
# page would be a warning, and so would a glob that matches nothing.

_RESULTS_PAGES = ("benchmarks", "reliability")
_RESULTS_MARKER = ".. results pages: conf.py puts their toctree here, listing those that exist\n"


def _results_toctree() -> str:
    present = [
        page
        for page in _RESULTS_PAGES
        if any((DOCS / f"{page}{suffix}").exists() for suffix in source_suffix)
    ]
    if not present:
        return ""
    entries = "".join(f"   {page}\n" for page in present)
    return f".. toctree::\n   :maxdepth: 1\n   :caption: Results\n\n{entries}"


def _fill_results_toctree(app: object, docname: str, source: list[str]) -> None:
    if docname == root_doc:
        if _RESULTS_MARKER not in source[0]:
            raise RuntimeError(f"{root_doc}.rst lost the marker comment {_RESULTS_MARKER!r}")
        source[0] = source[0].replace(_RESULTS_MARKER, _results_toctree())


def setup(app: Any) -> None:
    app.connect("source-read", _fill_results_toctree)
    app.connect("autodoc-process-signature", _attrs_signature)


# -- signatures of attrs classes ------------------------------------------------------------------
#
# autodoc renders an attrs class's generated __init__ with factory defaults as ``NOTHING``,
# and a default options object as its whole repr. Rebuild such signatures from
# attrs.fields, and shorten default instances to ``SessionManagerOptions()``.

_SHORT_DEFAULTS = {
    repr(trio_sessions.SessionManagerOptions()): "SessionManagerOptions()",
    repr(trio_sessions.RetryPolicy()): "RetryPolicy()",
}


def _default_text(field: attrs.Attribute[Any]) -> str:
    default: Any = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        factory = default.factory
        return f"{getattr(factory, '__name__', repr(factory))}()"
    return _SHORT_DEFAULTS.get(repr(default), repr(default))


def _attrs_signature(
    app: object,
    what: str,
    name: str,
    obj: object,
    options: object,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    if signature is None:
        return None
    if what in ("class", "exception") and isinstance(obj, type) and attrs.has(obj):
        parts: list[str] = []
        star = False
        for field in attrs.fields(obj):
            if not field.init:
                continue
            if field.kw_only and not star:
                parts.append("*")
                star = True
            text = field.alias or field.name
            if field.type is not None:
                annotation = field.type if isinstance(field.type, str) else field.type.__name__
                text += f": {annotation}"
            if field.default is not attrs.NOTHING:
                text += f" = {_default_text(field)}"
            parts.append(text)
        return f"({', '.join(parts)})", return_annotation
    for long, short in _SHORT_DEFAULTS.items():
        signature = signature.replace(long, short)
    return signature, return_annotation


# -- theme ---------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"trio-sessions {release}"
html_static_path: list[str] = []

# -- changelog: towncrier's draft of the unreleased notes ---------------------------------------
#
# history.rst holds released notes (towncrier writes them there on release) and includes
# the draft of the next release, rendered here from newsfragments/ at every build, so the
# page shows what has changed since the last release without anyone running towncrier.

_DRAFT = DOCS / "_build" / "towncrier-draft.rst.inc"


def _render_towncrier_draft() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "towncrier", "build", "--draft", "--version", "UNRELEASED"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"towncrier could not draft the changelog:\n{result.stderr}")
    # The draft is on stdout (towncrier's progress messages go to stderr). An empty
    # draft would mean the page silently lost its content: refuse it.
    draft = result.stdout
    if "UNRELEASED" not in draft:
        raise RuntimeError(f"towncrier printed no draft:\n{result.stdout}\n{result.stderr}")
    _DRAFT.parent.mkdir(parents=True, exist_ok=True)
    _DRAFT.write_text(draft.strip() + "\n", encoding="utf-8")


_render_towncrier_draft()
