"""``WWW-Authenticate`` parsing (RFC 9110 section 11.6.1 / RFC 7235 section 4.1).

Pure. A header value holds one or more challenges::

    challenge  = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
    auth-param = token BWS "=" BWS ( token / quoted-string )

Registries send, for example::

    Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"
    Basic realm="quay.io", Bearer realm="https://quay.io/v2/auth",service="quay.io"

Parameters are read by name, never by position (a regex that takes "the first two
quoted values" breaks on reordered or missing parameters), quoted strings may
contain commas and backslash escapes, and ``service`` or ``scope`` may be absent
(Artifact Registry sends only a realm).
"""

from __future__ import annotations

from dataclasses import dataclass, field

_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68_EXTRA = frozenset("-._~+/")

# Real headers are a few hundred bytes; refusing absurd ones keeps parsing linear and cheap.
MAX_HEADER_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lowercased: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict)  # keys lowercased
    token68: str | None = None

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def skip_ws_and_commas(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t,":
            self.pos += 1

    def token(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _TCHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def bare_value(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ", \t":
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str | None:
        """A quoted-string after its opening quote; None if it never closes."""
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if ch == '"':
                return "".join(out)
            if ch == "\\" and self.pos < len(self.text):
                ch = self.text[self.pos]
                self.pos += 1
            out.append(ch)
        return None


def _is_param_start(s: _Scanner) -> bool:
    """After optional whitespace, is the next thing ``token =`` (a parameter, not a new scheme)?"""
    save = s.pos
    s.skip_ws()
    name = s.token()
    s.skip_ws()
    result = False
    if name and s.peek() == "=":
        # "abc==" is a token68 whose padding looks like "=": a parameter needs a value.
        s.pos += 1
        s.skip_ws()
        result = s.peek() == '"' or (s.peek() != "" and s.peek() in _TCHARS)
    s.pos = save
    return result


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Parse a header value into its challenges; malformed parts end parsing, never raise."""
    if len(value) > MAX_HEADER_LENGTH:
        return []
    s = _Scanner(value)
    challenges: list[Challenge] = []
    while True:
        s.skip_ws_and_commas()
        if s.at_end():
            return challenges
        scheme = s.token()
        if not scheme:
            return challenges
        params: dict[str, str] = {}
        token68: str | None = None
        s.skip_ws()
        if not _is_param_start(s):
            # token68 form ("Negotiate abc123==") or a bare scheme.
            start = s.pos
            while not s.at_end() and (s.peek() in _TCHARS or s.peek() in _TOKEN68_EXTRA or s.peek() == "="):
                s.pos += 1
            token68 = s.text[start : s.pos] or None
        else:
            while True:
                s.skip_ws()
                name = s.token().lower()
                s.skip_ws()
                if not name or s.peek() != "=":
                    return challenges  # malformed: keep what parsed cleanly
                s.pos += 1
                s.skip_ws()
                if s.peek() == '"':
                    s.pos += 1
                    quoted = s.quoted()
                    if quoted is None:
                        return challenges
                    val = quoted
                else:
                    # RFC 9110 wants a token here, but realms are sent unquoted in the
                    # wild (realm=https://...): take everything up to "," or space.
                    val = s.bare_value()
                # The first occurrence wins (RFC 9110: a parameter MUST NOT occur twice).
                params.setdefault(name, val)
                s.skip_ws()
                if s.peek() != ",":
                    break
                # A comma either separates parameters or starts the next challenge.
                s.pos += 1
                s.skip_ws_and_commas()
                if not _is_param_start(s):
                    break
        challenges.append(Challenge(scheme=scheme.lower(), params=params, token68=token68))


def parse_challenges(values: list[str]) -> list[Challenge]:
    """Challenges from every ``WWW-Authenticate`` header of a response, in order."""
    out: list[Challenge] = []
    for value in values:
        out.extend(parse_www_authenticate(value))
    return out


def pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    """The challenge the gateway answers: Bearer (with a realm) over Basic, like Docker's client."""
    for c in challenges:
        if c.scheme == "bearer" and c.realm:
            return c
    for c in challenges:
        if c.scheme == "basic":
            return c
    return None
