"""Label selectors: a small, Calico-like expression language over endpoint labels.

    role == "db" && env != "prod"
    tier in {"web", "api"} || has(debug)
    !has(quarantine)
    all()

Parsed once into a tree of tuples; evaluation is a pure function of a label dict, so the
policy compiler can turn a selector into the set of endpoints it matches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<op>&&|\|\||==|!=|!|\(|\)|\{|\}|,)
      | (?P<str>"[^"]*"|'[^']*')
      | (?P<word>[A-Za-z0-9][A-Za-z0-9._/-]*)
    )""",
    re.VERBOSE,
)

Node = tuple  # ("all",) | ("has", k) | ("eq", k, v) | ("ne", k, v) | ("in", k, vs) | ("notin", k, vs)
#               | ("not", n) | ("and", a, b) | ("or", a, b)


class SelectorError(ValueError):
    pass


# A selector is evaluated by recursion on every endpoint change: bound its size so that no record
# can make the agent recurse deeply. Real selectors are a few terms long.
MAX_SELECTOR_CHARS = 1024
MAX_SELECTOR_NESTING = 16  # "(" and "!" levels
MAX_SELECTOR_TERMS = 64  # comparisons joined by && / ||


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            raise SelectorError(f"unexpected character {text[pos:].strip()[:1]!r} at offset {pos}")
        pos = m.end()
        if m.group("op"):
            tokens.append(("op", m.group("op")))
        elif m.group("str"):
            tokens.append(("str", m.group("str")[1:-1]))
        else:
            tokens.append(("word", m.group("word")))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        if len(text) > MAX_SELECTOR_CHARS:
            raise SelectorError(f"selector is {len(text)} characters long; at most {MAX_SELECTOR_CHARS}")
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0
        self.terms = 0

    def _nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_SELECTOR_NESTING:
            raise SelectorError(f"selector nests deeper than {MAX_SELECTOR_NESTING} levels")

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, kind: str, value: str | None = None) -> str:
        tok = self.peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            want = value or kind
            got = "end of selector" if tok is None else repr(tok[1])
            raise SelectorError(f"expected {want!r}, got {got}")
        self.i += 1
        return tok[1]

    def parse(self) -> Node:
        if not self.tokens:
            raise SelectorError("empty selector (use all() to select every endpoint)")
        node = self.expr()
        if self.peek() is not None:
            raise SelectorError(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return node

    def expr(self) -> Node:
        node = self.term()
        while self.peek() == ("op", "||"):
            self.i += 1
            node = ("or", node, self.term())
        return node

    def term(self) -> Node:
        node = self.factor()
        while self.peek() == ("op", "&&"):
            self.i += 1
            node = ("and", node, self.factor())
        return node

    def factor(self) -> Node:
        tok = self.peek()
        if tok == ("op", "!"):
            self.i += 1
            self._nest()
            node = ("not", self.factor())
            self.depth -= 1
            return node
        if tok == ("op", "("):
            self.i += 1
            self._nest()
            node = self.expr()
            self.take("op", ")")
            self.depth -= 1
            return node
        self.terms += 1
        if self.terms > MAX_SELECTOR_TERMS:
            raise SelectorError(f"selector has more than {MAX_SELECTOR_TERMS} terms")
        word = self.take("word")
        if word in ("all", "has") and self.peek() == ("op", "("):
            self.i += 1
            if word == "all":
                self.take("op", ")")
                return ("all",)
            key = self.take("word")
            self.take("op", ")")
            return ("has", key)
        tok = self.peek()
        if tok in (("op", "=="), ("op", "!=")):
            self.i += 1
            value = self.take("str")
            return ("eq" if tok[1] == "==" else "ne", word, value)
        if tok == ("word", "in") or tok == ("word", "not"):
            self.i += 1
            negate = tok[1] == "not"
            if negate:
                self.take("word", "in")
            return ("notin" if negate else "in", word, self.value_set())
        raise SelectorError(f"expected ==, !=, in or not in after {word!r}")

    def value_set(self) -> frozenset[str]:
        self.take("op", "{")
        values: set[str] = set()
        if self.peek() != ("op", "}"):
            values.add(self.take("str"))
            while self.peek() == ("op", ","):
                self.i += 1
                values.add(self.take("str"))
        self.take("op", "}")
        return frozenset(values)


def _eval(node: Node, labels: Mapping[str, str]) -> bool:
    op = node[0]
    if op == "all":
        return True
    if op == "has":
        return node[1] in labels
    if op == "eq":
        return labels.get(node[1]) == node[2]
    if op == "ne":
        return labels.get(node[1]) != node[2]
    if op == "in":
        return labels.get(node[1]) in node[2]
    if op == "notin":
        return labels.get(node[1]) not in node[2]
    if op == "not":
        return not _eval(node[1], labels)
    if op == "and":
        return _eval(node[1], labels) and _eval(node[2], labels)
    return _eval(node[1], labels) or _eval(node[2], labels)


@dataclass(frozen=True)
class Selector:
    text: str
    tree: Node

    def matches(self, labels: Mapping[str, str]) -> bool:
        return _eval(self.tree, labels)


@lru_cache(maxsize=4096)
def parse_selector(text: str) -> Selector:
    return Selector(text, _Parser(text).parse())


def check_selector(text: str) -> str:
    parse_selector(text)
    return text
