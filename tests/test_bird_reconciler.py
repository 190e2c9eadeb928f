"""The BIRD reconciler against a real bird in a namespace: the running bird ends with the config
asked for, however the starts and changes interleave."""

from __future__ import annotations

from pathlib import Path

from agentlib import namespace

from tabby.dataplane.bird import BirdReconciler
from tabby.lab import netns, probe


def config(*blocks: str) -> str:
    routes = "".join(f"    route {b} blackhole;\n" for b in blocks)
    return ("router id 10.0.0.1;\nprotocol device {}\n"
            f"protocol static blocks {{\n    ipv6;\n{routes}}}\n"
            "protocol kernel k6 { ipv6 { export all; }; }\n")


def blackholes(ns: str) -> set[str]:
    return {w for w in netns.ip("-6", "route", "show", "type", "blackhole", ns=ns).split() if w.startswith("fd00:")}


def test_a_config_on_file_that_the_running_bird_never_read_is_sent_to_it(tmp_path: Path) -> None:
    """A config written while a bird was starting on the one before it is on file, but the bird
    never read it: the next apply must send it (it compared the file with what was asked, saw
    them equal, and the block stayed out of the kernel for good)."""
    with namespace("bd") as ns:
        bird = BirdReconciler(tmp_path / "run")
        try:
            bird.set_config(config("fd00:99::/64"))
            assert probe.in_ns(ns, bird.apply)
            assert bird.pid() is not None, "a started bird is known by its pid at once"
            netns.wait_for(lambda: blackholes(ns) == {"fd00:99::/64"}, 10, 0.05, "the first block")
            wanted = config("fd00:99::/64", "fd00:98::/64")
            bird.conf.write_text(wanted)  # on file, but the running bird read the first
            bird.set_config(wanted)
            assert probe.in_ns(ns, bird.apply)
            netns.wait_for(lambda: blackholes(ns) == {"fd00:99::/64", "fd00:98::/64"}, 10, 0.05,
                           "the second block, from the config the bird had not read")
            assert not probe.in_ns(ns, bird.apply), "nothing left to do"
        finally:
            bird.stop()
