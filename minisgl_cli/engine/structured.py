"""Structured outputs: what a request's text must match (a JSON schema, any JSON object, a regex, one of some
strings, an EBNF grammar), as an xgrammar grammar.

This module holds the request's side: `StructuredOutput`, checked when the request is made, so a bad schema is
the caller's error (HTTP 400) before anything runs. The engine's side (compiling against the tokenizer's vocab,
one matcher per request, the token mask of each step) is engine/grammar.py.

JSON is generated compactly (`", "` and `": "` separators, no free whitespace): with free whitespace allowed, a
small model can spend its whole budget on newlines inside an object.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from minisgl_cli.errors import InvalidParameter, UsageError

if TYPE_CHECKING:
    import xgrammar

Kind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "choice", "grammar")

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: ": the user needs only the rest.
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


@dataclass(frozen=True)
class StructuredOutput:
    """The constraint of one request. `spec`: the JSON schema as JSON text (json_schema), the regex (regex), a
    JSON list of the allowed strings (choice), the EBNF grammar with a `root` rule (grammar), "" (json_object).
    `param` names the request field it came from, for error messages."""

    kind: str
    spec: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidParameter(
                f"unknown structured output kind {self.kind!r}: expected one of {', '.join(KINDS)}",
                param=self.param,
            )

    @classmethod
    def json_schema(cls, schema: dict | str, param: str = "response_format") -> StructuredOutput:
        text = schema if isinstance(schema, str) else json.dumps(schema)  # key order is the output's order
        return cls("json_schema", text, param)

    @classmethod
    def choice(cls, options: list[str], param: str = "choice") -> StructuredOutput:
        return cls("choice", json.dumps(list(options)), param)

    @property
    def cache_key(self) -> tuple[str, str]:
        """Equal constraints compile once (the param a request named it by does not change the grammar)."""
        return (self.kind, self.spec)

    def check(self) -> None:
        """InvalidParameter naming what is wrong when the constraint is not a valid grammar. Remembered for
        valid ones: every process a request passes through (API, tokenizer, scheduler) validates its
        SamplingParams again, and n choices are n copies."""
        _check(self)

    def grammar(self) -> xgrammar.Grammar:
        """The xgrammar grammar of this constraint (not yet compiled against a vocabulary)."""
        import xgrammar as xgr

        try:
            if self.kind == "json_object":
                # Any object, compact like the schemas' (xgrammar's builtin JSON grammar allows free whitespace).
                return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
            if self.kind == "json_schema":
                return _strict_strings(xgr.Grammar.from_json_schema(self._schema(), any_whitespace=False))
            if self.kind == "regex":
                return xgr.Grammar.from_regex(self.spec)
            if self.kind == "choice":
                return xgr.Grammar.from_ebnf(
                    "root ::= " + " | ".join(_ebnf_string(c) for c in self._choices())
                )
            return xgr.Grammar.from_ebnf(self.spec)
        except (RuntimeError, ValueError, TypeError) as e:
            if isinstance(e, InvalidParameter):
                raise
            what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "EBNF grammar"}.get(
                self.kind, self.kind
            )
            detail = _LOCATION.sub("", str(e).strip()).strip()
            raise InvalidParameter(f"invalid {what} in {self.param}: {detail}", param=self.param) from None

    def _schema(self) -> str:
        try:
            schema = json.loads(self.spec)
        except json.JSONDecodeError as e:
            raise InvalidParameter(
                f"the JSON schema in {self.param} is not JSON: {e}", param=self.param
            ) from None
        if not isinstance(schema, dict):
            raise InvalidParameter(f"the JSON schema in {self.param} must be an object", param=self.param)
        return self.spec

    def _choices(self) -> list[str]:
        options = json.loads(self.spec)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise InvalidParameter(
                f"{self.param} must be a non-empty list of non-empty strings", param=self.param
            )
        return options


@functools.lru_cache(maxsize=1024)
def _check(structured: StructuredOutput) -> None:
    structured.grammar()  # raises for an invalid one, which lru_cache does not keep


def read_json_schema(path: Path, where: str) -> dict[str, Any]:
    """The JSON schema in `path`, checked as a constraint (UsageError naming the file and the problem)."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{where}: {path} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{where}: {path} must hold a JSON schema object")
    StructuredOutput.json_schema(schema, param=f"{where} {path}").check()
    return schema


# xgrammar (0.2.9) writes a string with minLength/maxLength as a repeat of this class, which lets raw control
# characters (U+0000-U+001F) through: invalid JSON that json.loads refuses. Its unbounded strings exclude them.
_LOOSE_CHAR = r"[^\"\\\r\n]"
_JSON_CHAR = r"[^\0-\x1f\"\\]"


def _strict_strings(grammar: xgrammar.Grammar) -> xgrammar.Grammar:
    """`grammar` with its length-bounded JSON strings' characters limited to what JSON allows unescaped."""
    import xgrammar as xgr

    text = str(grammar)
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHAR, _JSON_CHAR)) if _LOOSE_CHAR in text else grammar


def _ebnf_string(text: str) -> str:
    """`text` as an EBNF string literal: JSON's escapes are the ones xgrammar's EBNF reads."""
    return json.dumps(text, ensure_ascii=False)
