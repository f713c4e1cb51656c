"""The project's one user-facing error type for bad input."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem in a user's input: where it is, what is wrong, how to fix it."""

    source: str  # file path (optionally :line:col) or "--set"
    key: str  # dotted key, "" when the whole file is at fault
    message: str
    fix: str

    def line(self) -> str:
        where = f"{self.source}: {self.key}" if self.key else self.source
        return f"{where}: {self.message} ({self.fix})"


class ConfigError(Exception):
    """Every problem found in a config, collected before raising."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(p.line() for p in problems))

    def __reduce__(self):  # copy/pickle (Ray re-raises copies of trial errors)
        return (ConfigError, (self.problems,))

    def lines(self) -> list[str]:
        return [p.line() for p in self.problems]
