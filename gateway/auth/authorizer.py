"""Who may send what ``Authorization`` where: upstream authorization, one hop at a time.

A request may reach several origins: the route's upstream, then a redirect target (a
CDN, or registry.k8s.io's Artifact Registry with a token realm of its own). For each
hop the upstream client asks its route's authorizer two questions, in the spirit of
go-containerregistry's ``transport/bearer.go``:

- ``up_front``: the Authorization to send to this origin before it asks (a token for
  the challenge it sent last time, so that a warm pull costs one request, not two);
- ``answer``: the Authorization that answers this 401 challenge (``None``: relay the 401).

Two implementations, one per route mode (``routes.UpstreamAuth``):

- ``GatewayTokenAuthorizer`` (``auth = "gateway"``): the gateway's own tokens, anonymous or
  bought with the route's credentials. The credentials answer challenges from the one
  upstream they belong to (``credentials_origin``) and nowhere else; a redirect target's
  challenge is answered anonymously. A refused token is dropped and one fresh token
  tried, once. An account whose secret comes from a docker credential helper is resolved
  (``credential_helper.py``) just before a token is bought; when the token endpoint refuses
  the helper's answer (401/403) the helper is asked once more and the fetch retried once.
- ``ClientTokenAuthorizer`` (``auth = "passthrough"``): the client's own token goes to the
  route's upstreams (which issued it) and to nothing else; any other origin is treated
  as above, anonymously.

Token realms must pass the route's address policy before a token is asked for
(``policy.py``). Adding a mode is a type in ``routes.py`` and a class here.
"""

from __future__ import annotations

import abc
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from gateway.auth.challenge import Challenge, parse_challenges, pick_challenge
from gateway.auth.credential_helper import CredentialHelpers
from gateway.auth.tokens import CredentialsRefused, Token, TokenCache, TokenKey, basic_authorization, fetch_token
from gateway.http.errors import LoginRequired, RegistryError
from gateway.net.upstream_errors import check_destination
from gateway.observe import metrics
from gateway.routing.budget import ANONYMOUS, CLIENT, BudgetStore
from gateway.routing.policy import Origin
from gateway.routing.routes import ClientTokens, Credentials, GatewayTokens, Route
from gateway.settings import Timeouts


@dataclass(frozen=True, slots=True)
class Login:
    """What authorizes one client request upstream: the client's own Authorization, or nothing of its."""

    client_authorization: str | None = None

    @property
    def from_client(self) -> bool:
        return self.client_authorization is not None


GATEWAY_LOGIN = Login()


@dataclass(frozen=True, slots=True)
class Hop:
    """One origin a request reaches, and the repository a token for it must grant."""

    origin: Origin
    repository: str


class Authorizer(abc.ABC):
    """One route's upstream authorization: the challenges each origin sent, and how to answer them."""

    #: Whether an upstream answer is the same whoever asked, so that it may be served to
    #: another client (the manifest cache).
    shares_answers: bool = True

    def __init__(self, route: Route, tokens: TokenCache, transport: httpx.AsyncBaseTransport, timeouts: Timeouts):
        self.route = route
        self.tokens = tokens
        self.transport = transport
        self.timeouts = timeouts
        self.trusted_origins = route.origins
        # The last challenge each origin sent, without its scope (the scope belongs to one
        # repository): lets later requests attach a token up front.
        self._challenges: dict[Origin, Challenge] = {}

    @abc.abstractmethod
    def admit(self, authorization: str | None, repository: str | None) -> Login:
        """The login a client request carries; raises LoginRequired when it must log in first."""

    @abc.abstractmethod
    async def up_front(self, login: Login, hop: Hop) -> str | None:
        """The Authorization to send to ``hop`` before it asks, if any."""

    @abc.abstractmethod
    async def answer(self, login: Login, hop: Hop, challenges: Sequence[str], sent: str | None) -> str | None:
        """The Authorization answering a 401 with these ``WWW-Authenticate`` values; None: relay the 401."""

    @abc.abstractmethod
    def identity_for(self, login: Login, origin: Origin) -> str:
        """Whose pull budget an answer from ``origin`` spends: ``user:<name>``, ``anonymous`` or ``client``.

        Never a secret: what the budget gauges and the status endpoint show (``budget.py``).
        """

    def identity_of(self, authorization: str | None) -> str | None:
        """Whose credential bought ``authorization`` (a value this authorizer gave), if known."""
        return None

    async def rate_limited(self, login: Login, hop: Hop, sent: str | None, retry_after: str | None) -> str | None:
        """The Authorization to try after a 429 to ``sent`` (another account of a pool); None: the 429 stands."""
        return None

    @abc.abstractmethod
    def note_rate_limited(self, login: Login, hop: Hop, sent: str | None, retry_after: str | None) -> None:
        """Count a 429 for whoever spent the budget, also one the pool or failover absorbs before the client."""

    def remembered(self, origin: Origin) -> Challenge | None:
        return self._challenges.get(origin)

    def remember(self, origin: Origin, challenge: Challenge) -> Challenge:
        known = Challenge(challenge.scheme, {k: v for k, v in challenge.params.items() if k != "scope"})
        self._challenges[origin] = known
        return known

    def check_realm(self, realm: str) -> None:
        check_destination(self.route, realm, "sent its token realm")


class GatewayTokenAuthorizer(Authorizer):
    """The gateway's own tokens: anonymous, or bought with the route's credentials for their upstream only."""

    def __init__(
        self,
        route: Route,
        tokens: TokenCache,
        transport: httpx.AsyncBaseTransport,
        timeouts: Timeouts,
        mode: GatewayTokens | None = None,
        budgets: BudgetStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(route, tokens, transport, timeouts)
        self.mode = mode or GatewayTokens()
        self.budgets = budgets
        self._clock = clock
        # Accounts a 429 exhausted, until their window ends (monotonic time), and which account
        # bought each Authorization value handed out (bounded: a few per account and scope).
        self._exhausted: dict[str, float] = {}
        self._bought_by: OrderedDict[str, str] = OrderedDict()
        # Accounts whose secret a docker credential helper gives: their answers, one call at a time.
        self.helpers = CredentialHelpers(timeouts.credential_helper)

    def admit(self, authorization: str | None, repository: str | None) -> Login:
        return GATEWAY_LOGIN  # the client's Authorization is never sent upstream

    def identity_for(self, login: Login, origin: Origin) -> str:
        credentials = self.credentials_for(origin)
        return credentials.identity if credentials is not None else ANONYMOUS

    def identity_of(self, authorization: str | None) -> str | None:
        return self._bought_by.get(authorization) if authorization is not None else None

    def credentials_for(self, origin: Origin, repository: str = "") -> Credentials | None:
        """The credentials for ``repository`` at ``origin``: the route's (or, with several accounts, the
        pool's account with the most budget left and not exhausted), for their one origin; None elsewhere."""
        if origin != self.mode.credentials_origin:
            return None
        pool = self.mode.candidates(repository)
        if len(pool) <= 1:
            return pool[0] if pool else None
        now = self._clock()
        live = [c for c in pool if self._exhausted.get(c.identity, 0.0) <= now]
        if not live:  # every account rests: the one whose window ends first
            return min(pool, key=lambda c: self._exhausted.get(c.identity, 0.0))
        return max(live, key=self._budget_left)

    def _budget_left(self, credentials: Credentials) -> float:
        known = self.budgets.get(self.route.name, credentials.identity) if self.budgets is not None else None
        # An account never heard of yet has its whole budget: try it.
        return float("inf") if known is None or known.remaining is None else float(known.remaining)

    def note_rate_limited(self, login: Login, hop: Hop, sent: str | None, retry_after: str | None) -> None:
        identity = self.identity_of(sent) or self.identity_for(login, hop.origin)
        if self.budgets is not None:
            self.budgets.rate_limited(self.route.name, identity, retry_after)
        metrics.upstream_rate_limited(self.route.name, identity)

    async def rate_limited(self, login: Login, hop: Hop, sent: str | None, retry_after: str | None) -> str | None:
        identity = self.identity_of(sent)
        if identity is None:
            return None  # anonymous, or not ours: nothing to rotate to
        self._exhausted[identity] = self._clock() + self._rest(identity, retry_after)
        following = self.credentials_for(hop.origin, hop.repository)
        known = self._challenges.get(hop.origin)
        if following is None or following.identity == identity or known is None:
            return None
        if self._exhausted.get(following.identity, 0.0) > self._clock():
            return None  # every account of the pool is exhausted: the next upstream, or the 429
        return await self._authorization(known, hop, None, following)

    def _rest(self, identity: str, retry_after: str | None) -> float:
        """How long a rate-limited account rests: Retry-After, else the budget's window, else a minute."""
        if retry_after is not None and retry_after.strip().isdigit():
            return float(min(int(retry_after), 86_400))
        known = self.budgets.get(self.route.name, identity) if self.budgets is not None else None
        return float(known.window) if known is not None and known.window else 60.0

    async def up_front(self, login: Login, hop: Hop) -> str | None:
        known = self._challenges.get(hop.origin)
        if known is None:
            return None
        try:
            return await self._authorization(known, hop, None)
        except RegistryError:
            # The remembered realm fails: forget it and ask the upstream where its token
            # service is now (a registry may move it); if that fails too, the error stands.
            self._challenges.pop(hop.origin, None)
            return None

    async def answer(self, login: Login, hop: Hop, challenges: Sequence[str], sent: str | None) -> str | None:
        challenge = pick_challenge(parse_challenges(list(challenges)))
        if challenge is None:
            return None
        self.remember(hop.origin, challenge)
        fresh = await self._authorization(challenge, hop, sent)
        return None if fresh == sent else fresh

    async def _authorization(
        self, challenge: Challenge, hop: Hop, refused: str | None, credentials: Credentials | None = None
    ) -> str | None:
        """The Authorization value answering ``challenge`` for ``hop.repository``."""
        credentials = credentials or self.credentials_for(hop.origin, hop.repository)
        if challenge.scheme == "basic":
            if credentials is None:
                return None
            resolved = await self.helpers.resolve(credentials, hop.origin)
            if refused is not None and refused == basic_authorization(resolved) and credentials.helper is not None:
                # The upstream refused the helper's answer: ask the helper again, once.
                self.helpers.forget(credentials, hop.origin, resolved)
                resolved = await self.helpers.resolve(credentials, hop.origin)
            return self._bought(basic_authorization(resolved), credentials)
        realm = challenge.realm
        if realm is None:
            return None
        self.check_realm(realm)
        scope = challenge.scope or f"repository:{hop.repository}:pull"
        key = TokenKey(
            realm=realm,
            service=challenge.service,
            scopes=tuple(scope.split(" ")),
            identity=credentials.identity if credentials else None,
        )
        if refused is not None and refused.startswith("Bearer "):
            self.tokens.invalidate(key, refused[7:])

        async def fetch() -> Token:
            try:
                if credentials is None or credentials.helper is None:
                    return await fetch_token(self.transport, key, credentials, timeouts=self.timeouts)
                resolved = await self.helpers.resolve(credentials, hop.origin)
                try:
                    return await fetch_token(self.transport, key, resolved, timeouts=self.timeouts)
                except CredentialsRefused:
                    # A helper's secret rotates (a cloud's short-lived password): the endpoint refused the
                    # cached answer, so ask the helper again and retry once; a second refusal stands.
                    self.helpers.forget(credentials, hop.origin, resolved)
                    resolved = await self.helpers.resolve(credentials, hop.origin)
                    return await fetch_token(self.transport, key, resolved, timeouts=self.timeouts)
            except RegistryError:
                metrics.upstream_error(self.route.name, "token")
                raise

        return self._bought("Bearer " + await self.tokens.obtain(key, fetch), credentials)

    def _bought(self, authorization: str, credentials: Credentials | None) -> str:
        if credentials is not None:
            self._bought_by[authorization] = credentials.identity
            self._bought_by.move_to_end(authorization)
            if len(self._bought_by) > 4096:
                self._bought_by.popitem(last=False)
        return authorization


class ClientTokenAuthorizer(GatewayTokenAuthorizer):
    """The client's own token, to the route's upstreams only; other origins as the gateway, anonymously."""

    shares_answers = False

    def admit(self, authorization: str | None, repository: str | None) -> Login:
        if authorization is None or not authorization.isascii():
            raise LoginRequired(self.route.name, repository)
        return Login(authorization)

    def identity_for(self, login: Login, origin: Origin) -> str:
        # The figures belong to whichever client asked last: one name for all of them.
        return CLIENT if origin in self.trusted_origins else ANONYMOUS

    async def up_front(self, login: Login, hop: Hop) -> str | None:
        if hop.origin in self.trusted_origins:
            return login.client_authorization
        return await super().up_front(login, hop)

    async def answer(self, login: Login, hop: Hop, challenges: Sequence[str], sent: str | None) -> str | None:
        if hop.origin in self.trusted_origins:
            return None  # the upstream refused the client's token: the client must log in again
        return await super().answer(login, hop, challenges, sent)


def authorizer_for(
    route: Route,
    tokens: TokenCache,
    transport: httpx.AsyncBaseTransport,
    timeouts: Timeouts,
    budgets: BudgetStore | None = None,
) -> Authorizer:
    """The authorizer for the route's mode."""
    mode = route.auth
    if isinstance(mode, ClientTokens):
        return ClientTokenAuthorizer(route, tokens, transport, timeouts)
    return GatewayTokenAuthorizer(route, tokens, transport, timeouts, mode, budgets)
