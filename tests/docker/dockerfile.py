"""Read what an image runs from its Dockerfile: the final stage's ENV, ENTRYPOINT, CMD and friends.

Enough of the Dockerfile syntax for this project's two files: line continuations, comments, the
`ENV k=v ...` and `ENV k v` forms, exec-form (JSON) ENTRYPOINT/CMD, `$VAR`/`${VAR}` in ENV values.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass
class Stage:
    base: str
    env: list[tuple[str, str]] = field(default_factory=list)  # in order, values unexpanded
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str | None = None
    stopsignal: str | None = None
    healthcheck: str | None = None
    expose: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        return [*self.entrypoint, *self.cmd]

    def environment(self, base_env: dict[str, str]) -> dict[str, str]:
        """The ENV values expanded the way the builder does: against the base and earlier ENVs."""
        env = dict(base_env)
        for name, value in self.env:
            env[name] = _VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)
        return {name: env[name] for name, _ in self.env}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comment lines dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines may sit inside a continuation too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    if pending:
        raise ValueError("the Dockerfile ends inside a line continuation")
    return result


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)  # shell form would put /bin/sh -c between the runtime and us
    if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        raise ValueError(f"not an exec-form (JSON array) instruction: {arguments}")
    return value


def _env_pairs(arguments: str) -> list[tuple[str, str]]:
    words = shlex.split(arguments)
    if "=" not in words[0]:  # legacy `ENV name value...`
        return [(words[0], arguments.split(None, 1)[1])]
    return [tuple(word.split("=", 1)) for word in words]  # type: ignore[misc]


def final_stage(path: Path) -> Stage:
    stage: Stage | None = None
    for keyword, arguments in instructions(path.read_text()):
        if keyword == "FROM":
            stage = Stage(base=arguments.split()[0])
        elif stage is None:
            continue  # ARGs before the first FROM
        elif keyword == "ENV":
            stage.env.extend(_env_pairs(arguments))
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = _exec_form(arguments)
            stage.cmd = []  # as the builder does: ENTRYPOINT resets an inherited CMD
        elif keyword == "CMD":
            stage.cmd = _exec_form(arguments)
        elif keyword == "USER":
            stage.user = arguments
        elif keyword == "STOPSIGNAL":
            stage.stopsignal = arguments
        elif keyword == "HEALTHCHECK":
            stage.healthcheck = arguments
        elif keyword == "EXPOSE":
            stage.expose.extend(arguments.split())
        elif keyword == "VOLUME":
            stage.volumes.extend(_exec_form(arguments))
    if stage is None:
        raise ValueError(f"{path} has no FROM")
    return stage
