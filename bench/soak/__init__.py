"""``python -m bench.soak``: minutes of mixed pulls by real clients through fronts that misbehave.

The test bed (real distribution registries with token auth, the nginx CDN) stands behind
``FaultFront``s, and a real gateway process serves two routes: ``ghcr.io`` with two upstreams (A
and B, fronts before the same registry) and a mirror (a front that flips bytes on command), and
``docker.io`` whose blob redirects lead to CDN URLs that expire while bodies stream. A scheduler
injects faults all the time (``chaos.py``); skopeo, ctr and curl pull at once (``pulls.py``);
the gateway's processes are watched (``watch.py``); the counts are read from the clients, the
gateway's JSON log and the fronts' request logs (``tally.py``). See docs/testing.md.
"""
