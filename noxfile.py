"""Development tasks, after hynek/stamina's noxfile.

``nox`` runs lint, typecheck and tests (over both dependency sets) and then, outside CI,
the combined coverage report. CI (``.ci/run``, the README's test command) runs
``nox -s lint typecheck tests coverage``, then ``nox -s chaos -- --quick``. Opt-in sessions:
``docs``, ``bench``, ``chaos`` (full run), ``demo``, ``integration`` and ``changelog``.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.error_on_external_run = True
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

# The tests must import the installed package (site-packages), not the checkout, or we would
# not be testing what we ship. `coverage run -m pytest`, like `python -m`, puts the working
# directory first on sys.path; PYTHONSAFEPATH (Python 3.11, honoured by coverage >= 7.8)
# stops that. Scripts (benchmarks) get their own directory on sys.path, which is harmless.
SAFE_PATH = {"PYTHONSAFEPATH": "1"}

# Every name>=version in [project].dependencies, e.g. "trio>=0.25.0".
_LOWER_BOUND = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)>=(?P<version>[^,;\s]+)")


def _lowest_pins() -> list[str]:
    """Pin each required dependency to the lower bound that pyproject.toml declares."""
    pins = []
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = _LOWER_BOUND.fullmatch(requirement.replace(" ", ""))
        if match is None:
            raise ValueError(f"write {requirement!r} as name>=version so it has a lowest version")
        pins.append(f"{match['name']}=={match['version']}")
    return pins


def _get_pkg(posargs: list[str]) -> tuple[str, list[str]]:
    """Take ``--installpkg path/to/built.whl`` out of posargs, to test a built artifact.

    ``nox -s tests -- --installpkg dist/trio_sessions-0.1.0-py3-none-any.whl -x``
    """
    posargs = list(posargs)
    if "--installpkg" in posargs:
        at = posargs.index("--installpkg")
        pkg = posargs[at + 1]
        del posargs[at : at + 2]
        return pkg, posargs
    return ".", posargs


def _existing(*paths: str) -> list[str]:
    """The paths that exist and hold Python code (git does not keep empty directories)."""
    return [path for path in paths if (ROOT / path).is_file() or any((ROOT / path).rglob("*.py"))]


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) and flake8-async."""
    session.install("ruff", "flake8", "flake8-async")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # ruff lacks some flake8-async checks (ASYNC101, ASYNC102, ...); trio runs both. Ignored:
    # ASYNC9xx (opt-in in flake8-async too), ASYNC114 (wants every startable function listed
    # in an option), and ASYNC124 in tests and the docs' examples (handlers are async
    # because the API says so).
    session.run(
        "flake8",
        "--select=ASYNC",
        "--extend-ignore=ASYNC9,ASYNC114",
        "--per-file-ignores=tests/*:ASYNC124 docs/examples/*:ASYNC124",
        *_existing("trio_sessions", "tests", "benchmarks", "docs"),
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, tests, benchmarks and this file."""
    session.install(".[tests,cli,emulator]", "mypy", "nox")
    # The targets are pyproject's [tool.mypy] files, less those with no code yet: mypy
    # refuses a directory without Python files (benchmarks/, until the first benchmark).
    targets = session.posargs or _existing(*PYPROJECT["tool"]["mypy"]["files"])
    session.run("mypy", *targets)


@nox.session
@nox.parametrize("deps", ["lowest", "newest"])
def tests(session: nox.Session, deps: str) -> None:
    """pytest under coverage, on the installed package, with the lowest or newest deps."""
    pkg, posargs = _get_pkg(session.posargs)
    pins = _lowest_pins()
    if deps == "lowest":
        # One resolve, so pip rejects lower bounds that contradict each other.
        session.install(f"{pkg}[tests,emulator]", *pins)
    else:
        session.install("--upgrade", "--upgrade-strategy=eager", f"{pkg}[tests,emulator]")
    session.run(
        "python",
        "-c",
        "import importlib.metadata as m, sys;"
        "print('testing with', *(f'{n}=={m.version(n)}' for n in sys.argv[1:]))",
        *(pin.partition("==")[0] for pin in pins),
    )

    env = {"COVERAGE_FILE": f".coverage.{deps}", **SAFE_PATH}
    session.run("coverage", "erase", env=env)  # this matrix cell's stale data, if any
    session.run("coverage", "run", "-m", "pytest", *posargs, env=env)

    if not posargs and os.environ.get("CI") != "true":
        session.notify("coverage")


@nox.session
def coverage(session: nox.Session) -> None:
    """Combine the tests sessions' coverage; fail under 90% (branch coverage)."""
    session.install("coverage[toml]>=7.10")
    # Combines .coverage.lowest.* and .coverage.newest.*; [tool.coverage.paths] maps each
    # session's site-packages/trio_sessions onto the source tree. Branch coverage is on.
    session.run("coverage", "combine")
    session.run("coverage", "report", "--fail-under=90")


@nox.session
def docs(session: nox.Session) -> None:
    """Sphinx html and doctest builds, warnings as errors (skipped until docs/conf.py exists)."""
    if not (ROOT / "docs" / "conf.py").exists():
        session.skip("no docs yet (docs/conf.py)")
    session.install(".[docs]")
    for builder in ("html", "doctest"):
        session.run(
            "sphinx-build",
            *("-n", "-W", "--keep-going", "-T", "-E"),
            *("-b", builder, "-d", "docs/_build/doctrees"),
            "docs",
            f"docs/_build/{builder}",
        )


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmarks/bench_*.py with the posargs, e.g. ``nox -s bench -- --quick``."""
    scripts = sorted((ROOT / "benchmarks").glob("bench_*.py"))
    if not scripts:
        session.skip("no benchmarks yet (benchmarks/bench_*.py)")
    session.install(".[emulator]")  # bench_emulator.py runs the emulator
    for script in scripts:
        session.run("python", str(script.relative_to(ROOT)), *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """The chaos suite (issue 7): in-process under Hypothesis, then across OS processes.

    ``nox -s chaos`` is the full run: 1000 in-process examples, then 50 000 messages over
    5 000 sessions, 4 worker processes, >= 100 injected faults; it writes
    benchmarks/results/chaos.json and the table in docs/reliability.md. ``nox -s chaos --
    --quick`` is CI's short run (the multi-process part, small). Other posargs go to
    ``benchmarks/chaos.py run`` (``--seed``, ``--messages``, ...).
    """
    session.install(".[tests,emulator]")
    if "--quick" not in session.posargs:
        # The tests sessions run the in-process chaos with 100 examples; here, many more.
        session.run(
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_chaos.py",
            env={"CHAOS_EXAMPLES": "1000", **SAFE_PATH},
        )
    session.run("python", "benchmarks/chaos.py", "run", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """``trio-sessions demo``, with the posargs."""
    session.install(".[cli]")
    session.run("trio-sessions", "demo", *session.posargs)


@nox.session
def integration(session: nox.Session) -> None:
    """The tests marked ``azure``, against the live namespace in SERVICEBUS_CONNECTION_STR."""
    if not os.environ.get("SERVICEBUS_CONNECTION_STR"):
        session.skip("set SERVICEBUS_CONNECTION_STR to a namespace you may write to")
    session.install(".[tests]")
    session.run("pytest", "-m", "azure", *session.posargs, env=SAFE_PATH)


@nox.session
def changelog(session: nox.Session) -> None:
    """Draft the next release's notes from newsfragments/ (writes nothing)."""
    session.install("towncrier")
    session.run("towncrier", "build", "--version", "UNRELEASED", "--draft")
