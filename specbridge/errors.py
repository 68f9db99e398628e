"""The one error hierarchy. A `SpecbridgeError` is a user's mistake or a broken input (spec, HF config,
checkpoint, command-line arguments): the CLI and the API boundary catch this base class once and report one clear
line (exit 2). Any other exception is a bug in specbridge and shows as one (a traceback, exit 1).

    SpecbridgeError
      SpecError         problems in a spec, each a spanned diagnostic (file:line:col and a caret)
      ConversionError   a checkpoint or model problem: names the tensor key, the spec rule and the rank
      UsageError        a command-line or API argument that cannot work (paths, parallel sizes, options)

Under torchrun an error that every rank raises alike (`on_every_rank`: it depends on the arguments, config and spec
only, or the ranks agreed on it through a collective) is reported once, by rank 0; any other by the rank that has it.

This module imports nothing of specbridge: every layer (dsl, compiler, runtime, emitted bridges) may raise these.
"""

from __future__ import annotations


class SpecbridgeError(Exception):
    """Base of every error that is the user's to fix."""

    on_every_rank = False  # every rank raises this same error (so one report, from rank 0, is enough)

    def __init__(self, *args, on_every_rank: bool | None = None):
        super().__init__(*args)
        if on_every_rank is not None:
            self.on_every_rank = on_every_rank


class SpecError(SpecbridgeError):
    """All diagnostics of a spec, reported together. `diagnostics` are `dsl.diagnostics.Diagnostic`s (anything
    with a `span` and a `render(sources)`); `sources` maps file names to their text, for the carets."""

    on_every_rank = True  # every rank compiles the same spec for the same config

    def __init__(self, diagnostics, sources: dict[str, str] | None = None):
        self.diagnostics = tuple(sorted(diagnostics, key=lambda d: (d.span.file, d.span.line, d.span.column)))
        self.sources = sources or {}
        super().__init__(self.render())

    def render(self, limit: int = 20) -> str:
        shown = [d.render(self.sources) for d in self.diagnostics[:limit]]
        rest = len(self.diagnostics) - limit
        if rest > 0:
            shown.append(f"... and {rest} more")
        return "\n".join(shown)


class ConversionError(SpecbridgeError):
    """A checkpoint-level error: the message, and where: tensor key, spec rule (its span) and rank.

    `located(...)` answers the same error with the missing context filled in, so an outer layer adds what it
    knows (the rank, the rule) without re-parsing the message.
    """

    def __init__(self, message: str, *, key: str | None = None, rule=None, rank: int | None = None):
        self.message = message
        self.key, self.rule, self.rank = key, rule, rank
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.key is not None:
            where.append(f"key '{self.key}'")
        if self.rule is not None:
            where.append(f"rule at {self.rule}")
        if self.rank is not None:
            where.append(f"rank {self.rank}")
        return self.message + (f" [{', '.join(where)}]" if where else "")

    def located(self, *, key: str | None = None, rule=None, rank: int | None = None) -> "ConversionError":
        """This error with `key`, `rule` and `rank` filled in where it had none."""
        return type(self)(self.message, key=self.key if self.key is not None else key,
                          rule=self.rule if self.rule is not None else rule,
                          rank=self.rank if self.rank is not None else rank)


class UsageError(SpecbridgeError):
    """An argument that cannot work: a path that does not exist, parallel sizes that do not fit, an option clash."""
