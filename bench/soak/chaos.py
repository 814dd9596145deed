"""The fault scheduler: a thread that keeps injecting faults on the fronts while the clients pull.

Every ``period`` seconds it arms one fault, drawn at random (seeded, so a run can be replayed)
from what a registry, a CDN and a network do to a blob path: a reset mid-body, a stall (which
the gateway's idle timeout turns into a break), a 429 with ``Retry-After``, a 5xx, a Range
answered with a 200 or with other bytes, a byte flipped by the mirror. A fault is armed once
(``times=1``) on one front, so the route's other upstream stays healthy for that request: a
transfer the gateway cuts then is a failure of the gateway, not of the bed. Every
``token_every`` seconds the token server is restarted; the CDN URLs expire by themselves (the
edge, ``stage.py``). Nothing is armed in the quiet period at the end.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.soak.stage import CDN, IMAGES, MULTI, Stage

KINDS = ("reset", "stall", "429", "5xx", "ignore_range", "wrong_range", "flip")


@dataclass
class Chaos:
    stage: Stage
    seed: int
    period: float = 0.5
    token_every: float = 60.0
    token_down: float = 2.0
    armed: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Chaos:
        self._thread = threading.Thread(target=self._run, name="soak-chaos", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        # Disarm what did not fire; FaultFront.clear() would also drop the requests the tally reads.
        for front in self.stage.fronts.values():
            with front._lock:
                front._faults.clear()

    def _blobs(self, route: str) -> list[tuple[str, int]]:
        images = [self.stage.bed.images[name] for name in IMAGES[route]]
        return [(digest, size) for image in images for digest, size in image.blobs.items()]

    def _run(self) -> None:
        rng = random.Random(self.seed)
        next_restart = time.monotonic() + self.token_every / 2
        while not self._stop.wait(self.period):
            if time.monotonic() >= next_restart:
                self.stage.restart_token_server(self.token_down)
                self.armed["token_restart"] += 1
                next_restart = time.monotonic() + self.token_every
                continue
            self._arm(rng)

    def _arm(self, rng: random.Random) -> None:
        kind = rng.choice(KINDS)
        if kind == "flip":  # the mirror corrupts a blob it serves
            digest, size = rng.choice(self._blobs(MULTI))
            self.stage.fronts["M"].fault(digest, "flip", at=rng.randrange(size))
            self.armed["mirror_flip"] += 1
            return
        route = rng.choice((MULTI, MULTI, CDN))
        front = rng.choice(("A", "B", "M")) if route == MULTI else "H"
        digest, size = rng.choice(self._blobs(route))
        target = self.stage.fronts[front]
        if kind in ("429", "5xx"):
            # a blob, or every request for a moment (manifests and token-bearing retries too)
            match = digest if rng.random() < 0.5 else "/v2/"
            if kind == "429":
                target.fault(match, "status", status=429, headers={"Retry-After": "1"}, times=rng.randint(1, 3))
            else:
                target.fault(match, "status", status=rng.choice((500, 502, 503)), times=rng.randint(1, 3))
            self.armed[f"{kind}@{front}"] += 1
            return
        if route == CDN and kind in ("reset", "stall", "ignore_range", "wrong_range") and rng.random() < 0.5:
            front, target = "C", self.stage.fronts["C"]  # H answers blobs with redirects: the CDN breaks
        elif route == CDN and kind in ("reset", "stall", "ignore_range", "wrong_range"):
            # Or H breaks the manifests it serves itself.
            image = self.stage.bed.images[rng.choice(IMAGES[CDN])]
            manifest = rng.choice(sorted(image.manifests))
            # a reset only: a stalled manifest would hold its client for the gateway's read timeout
            target.fault(manifest, "reset", at=rng.randrange(1, 200))
            self.armed["manifest_reset@H"] += 1
            return
        if kind in ("reset", "stall"):
            target.fault(digest, kind, at=rng.randrange(1, size))
        else:
            target.fault(digest, "reset", at=rng.randrange(1, size))  # a resume only comes after a break
            target.fault(digest, kind)  # type: ignore[arg-type]
        self.armed[f"{kind}@{front}"] += 1
