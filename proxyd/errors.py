"""Errors that reach the operator, and the process exit codes that go with them."""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_OK = 0
EXIT_CONFIG = 1  # invalid configuration (check-config, run, reload --wait)
EXIT_USAGE = 2  # click's own code for bad command-line usage
EXIT_RUNTIME = 3  # could not start: bind failed, admin port taken, ...


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located as precisely as the loader could."""

    file: str
    line: int | None
    column: int | None
    key_path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        key = f" {self.key_path}:" if self.key_path else ""
        return f"{where}:{key} {self.message}"


@dataclass
class ConfigError(Exception):
    """Every problem found in one load; raised only after all of them were collected."""

    issues: list[ConfigIssue] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(str(i) for i in self.issues)
