"""The soak's clients: skopeo, ctr and curl, each in its own thread, pulling until told to stop.

Every pull is checked byte for byte against what was pushed (``Testbed.images``): skopeo's
``dir:`` copy by ``verify_dir_copy``, ctr's image by its digest and content store, curl's blob by
its sha256. A pull that ended cleanly with other bytes is ``wrong_clean`` (must never happen);
one that failed is ``failed`` (the tally finds out from the gateway's log whether the gateway cut
a transfer while an upstream was healthy); a curl that hangs up part way on purpose is
``aborted_on_purpose``.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.soak.stage import CDN, IMAGES, MULTI, Stage
from tests.e2e.clients import Containerd, Skopeo, sha256_file, verify_dir_copy
from tests.testbed.images import Image

PLATFORM = "linux/amd64"
CTR_TIMEOUT = 180.0


@dataclass
class Pull:
    client: str
    route: str
    what: str  # an image ref or a blob digest
    start: float
    end: float = 0.0
    outcome: str = ""  # intact | wrong_clean | failed | aborted_on_purpose
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _repo_path(route: str, image: Image) -> str:
    """The repository as a client names it to the gateway: ghcr.io by its path prefix, docker.io by default."""
    return f"{MULTI}/{image.repo}" if route == MULTI else image.repo


@dataclass
class Clients:
    stage: Stage
    seed: int
    skopeo: Skopeo | None
    containerd: Containerd | None
    curls: int = 2
    pulls: list[Pull] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def images(self) -> list[tuple[str, Image]]:
        return [(route, self.stage.bed.images[name]) for route, names in IMAGES.items() for name in names]

    def start(self) -> Clients:
        loops: list[tuple[str, Callable[[random.Random, Path], Pull]]] = []
        if self.skopeo is not None:
            loops.append(("skopeo", self._skopeo))
        if self.containerd is not None:
            loops.append(("ctr", self._ctr))
        loops += [(f"curl{i}", self._curl) for i in range(self.curls)]
        for index, (name, pull) in enumerate(loops):
            work = self.stage.workdir / "clients" / name
            work.mkdir(parents=True, exist_ok=True)
            rng = random.Random(self.seed * 100 + index)
            thread = threading.Thread(target=self._loop, args=(pull, rng, work), name=f"soak-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        """Let every client finish the pull it is in, then return."""
        self._stop.set()
        for thread in self._threads:
            thread.join(CTR_TIMEOUT + 30)

    def _loop(self, pull: Callable[[random.Random, Path], Pull], rng: random.Random, work: Path) -> None:
        while not self._stop.is_set():
            try:
                record = pull(rng, work)
            except Exception as exc:  # a harness error is a failed pull with its reason, not a dead thread
                record = Pull("harness", "", "", time.time(), time.time(), "failed", repr(exc)[-500:])
            if not record.end:
                record.end = time.time()
            with self._lock:
                self.pulls.append(record)
            if record.outcome == "failed":
                # as real clients do, back off a moment: a route that answers 503 at once would
                # otherwise turn the soak into a loop of failed pulls
                self._stop.wait(rng.uniform(0.5, 1.5))

    # ------------------------------------------------------------------ the clients
    def _skopeo(self, rng: random.Random, work: Path) -> Pull:
        assert self.skopeo is not None
        route, image = rng.choice(self.images())
        ref = f"127.0.0.1:{self.stage.gateway.port}/{_repo_path(route, image)}:{image.tag}"
        record = Pull("skopeo", route, ref, time.time())
        dest = work / "copy"
        try:
            self.skopeo.copy_all(ref, dest)
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            record.outcome, record.detail = "failed", str(exc)[-600:]
            return record
        record.end = time.time()
        try:
            verify_dir_copy(dest, image)
            record.outcome = "intact"
        except AssertionError as exc:  # skopeo said done, and a byte is wrong
            record.outcome, record.detail = "wrong_clean", str(exc)[-600:]
        shutil.rmtree(dest, ignore_errors=True)
        return record

    def _ctr(self, rng: random.Random, work: Path) -> Pull:
        ctr = self.containerd
        assert ctr is not None
        route, image = rng.choice(self.images())
        ref = f"{route}/{image.repo}:{image.tag}"
        record = Pull("ctr", route, ref, time.time())
        gateway = self.stage.gateway.url
        try:
            ctr.pull(ref, ctr.hosts_dir({MULTI: gateway, CDN: gateway}), "--platform", PLATFORM)
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            record.outcome, record.detail = "failed", str(exc)[-600:]
            self._ctr_clean(ctr)
            return record
        record.end = time.time()
        # ctr checks every digest itself; what it stored must be the image and its layers
        stored = set(ctr.ctr("content", "ls", "-q").stdout.split())
        wrong = ctr.image_digest(ref) != image.digest or not set(image.layers[PLATFORM]) <= stored
        record.outcome = "wrong_clean" if wrong else "intact"
        self._ctr_clean(ctr)
        return record

    @staticmethod
    def _ctr_clean(ctr: Containerd) -> None:
        with contextlib.suppress(AssertionError):
            ctr.remove_all()  # so that the next pull fetches every blob again

    def _curl(self, rng: random.Random, work: Path) -> Pull:
        route, image = rng.choice(self.images())
        digest, size = rng.choice(sorted(image.blobs.items()))
        url = f"{self.stage.gateway.url}/v2/{_repo_path(route, image)}/blobs/{digest}"
        out = work / "blob"
        out.unlink(missing_ok=True)
        argv = ["curl", "-sS", "-o", str(out), "-w", "%{http_code}", "-L", "--max-time", "120"]
        on_purpose = size > 4 << 20 and rng.random() < 0.3
        if on_purpose:  # hang up part way: the gateway must let go of the stream and its fetch
            argv += ["--limit-rate", str(size // 4), "--max-time", str(rng.uniform(0.5, 2.0))]
        elif size > 4 << 20:  # slow enough that the CDN URL expires while the body streams
            argv += ["--limit-rate", str(int(size / (1.5 * self.stage.ttl)) + 1)]
        record = Pull("curl", route, digest, time.time())
        proc = subprocess.run([*argv, url], capture_output=True, text=True)
        record.end = time.time()
        got = sha256_file(out) if out.exists() else ""
        length = out.stat().st_size if out.exists() else 0
        record.detail = f"exit={proc.returncode} http={proc.stdout.strip()} bytes={length} {proc.stderr.strip()[-300:]}"
        if on_purpose and proc.returncode == 28:
            record.outcome = "aborted_on_purpose"
        elif proc.returncode == 0 and proc.stdout.strip() == "200":
            record.outcome = "intact" if "sha256:" + got == digest and length == size else "wrong_clean"
        else:
            record.outcome = "failed"
        out.unlink(missing_ok=True)
        return record
