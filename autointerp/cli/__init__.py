"""Command line: parses, loads config, wires objects and calls a stage. No logic lives here.

The commands live in four modules of this package: stages (collect, sae train, explain, score, intervene, steer),
query (features list / show, search, export, inspect, usage, llm check), job (run, status) and review (the review
page); importing the package registers them all. What they print is drawn here too, and only here: render
(tables, lines and JSON of the query commands and status), show (`features show`) and progress (bars or log lines).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

# rich_markup_mode=None: help text is printed as written; rich markup would eat "[llm.NAME]" as a style tag.
app = typer.Typer(
    no_args_is_help=True, add_completion=False, rich_markup_mode=None, help="Explain, score and verify model features."
)
sae_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Sparse autoencoders.")
features_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Query the feature database.")
app.add_typer(sae_app, name="sae")
app.add_typer(features_app, name="features")
llm_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="LLM endpoints.")
app.add_typer(llm_app, name="llm")
# markup=False: model text, feature ids and error messages are printed as they are ("[llm.x]" stays visible).
console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True, markup=False)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")]
DbOpt = Annotated[str | None, typer.Option("--db", help="Database URL (default sqlite:///db/autointerp.sqlite).")]


def _progress() -> Any:
    from autointerp.cli.progress import progress

    return progress(console)


def _cfg(config: Path | None, overrides: dict[str, Any]) -> Any:
    from autointerp.config import load_config

    return load_config(config, overrides)


def _store(url: str, *, create: bool = False, write: bool = False) -> Any:
    """The database of a command. Read commands (the default) open only one that exists: a mistyped --db is an
    error naming it, never a new empty database. write=True: one that cannot be written is refused now, before a
    model loads. create=True (commands that collect): a new one is created, and said so."""
    from autointerp.store import open_store
    from autointerp.store.engine import sqlite_file

    file = sqlite_file(url)
    new = create and file is not None and not file.exists()
    store = open_store(url, create=create, writable=write or create)
    if new:
        console.print(f"created new database {file}")
    return store


# Errors that are the user's input, answered with a message and exit code 2 (module, class). Only the modules
# already imported are looked at: an error of a module that never loaded cannot have been raised, and the query
# commands then never import torch to find out.
_USER_ERRORS = (
    ("autointerp.config", "ConfigError"),
    ("autointerp.corpus", "CorpusError"),
    ("autointerp.collect.sampler", "NonFiniteActivations"),
    ("autointerp.intervene.hooks", "InterventionError"),
    ("autointerp.llm.types", "LLMError"),
    ("autointerp.prompts", "PromptError"),
    ("autointerp.store.engine", "StoreError"),
    ("autointerp.store.queries", "FeatureNotFound"),
    ("autointerp.subject.files", "ModelLoadError"),
    ("autointerp.subject.sae", "SAEFormatError"),
    ("autointerp.subject.names", "SiteError"),
    ("autointerp.jobs.budget", "BudgetError"),
    ("autointerp.jobs.loop", "JobError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[m], n) for m, n in _USER_ERRORS if m in sys.modules)


def _quiet_third_parties() -> None:
    """Our progress and summaries only: the hub's and transformers' own bars ("Loading weights", GGUF conversion),
    their info logging and the deprecation warnings of releases we already handle stay silent. Set here, at the
    entry point, not in the library: library users keep their own settings. The user's environment wins."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for module in ("transformers", "torch", "huggingface_hub", "accelerate"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def main() -> None:
    _quiet_third_parties()
    try:
        app()
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        from rich.text import Text

        console.print(Text.assemble(("error:", "red"), f" {exc}"))
        sys.exit(2)


# Registered last: the command modules use the app, consoles and helpers above.
from autointerp.cli import job, query, review, stages  # noqa: E402, F401
