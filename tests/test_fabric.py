"""The agent's pure derivations: BIRD inputs from records, an endpoint's status from what is known."""

from __future__ import annotations

from tabby.agent.fabric import bird_inputs, endpoint_status, host_links
from tabby.model import effective_config, validate
from tabby.model.ipam import Affinity


def host(name: str, n: int) -> object:
    return validate({"kind": "Host", "metadata": {"name": name}, "spec": {"ipv6_address": f"2001:db8::{n}"}})


def test_bird_inputs_leave_out_refused_hosts_and_a_refused_self() -> None:
    aff = Affinity(host="h1", cidr="2001:db8:e::/122", state="confirmed", since=1.0)
    pending = Affinity(host="h1", cidr="2001:db8:e::40/122", state="pending", since=1.0)
    pool = validate({"kind": "IPPool", "metadata": {"name": "p6"}, "spec": {"cidr": "2001:db8:e::/112"}})
    recs = [host("h1", 1), host("h2", 2), host("h3", 3), pool, aff, pending]
    inp = bird_inputs("h1", recs, {"h3": "conflict: ..."}, effective_config(None, None))
    assert inp is not None and [h.metadata.name for h in inp.hosts] == ["h1", "h2"]
    assert inp.blocks == ("2001:db8:e::/122",) and inp.default_asn == 64512 and inp.mesh
    assert bird_inputs("h3", recs, {"h3": "conflict: ..."}, effective_config(None, None)) is None
    assert bird_inputs("h9", recs, {}, effective_config(None, None)) is None


def test_endpoint_status_precedence() -> None:
    base = {"conflict": None, "interface": "tap1", "present": True, "policy_error": None, "policy_covers": True,
            "failures": [], "corrupt": None, "pending": False}
    assert endpoint_status(**base) == ("up", "")
    assert endpoint_status(**{**base, "pending": True}) == ("down", "programming")
    assert endpoint_status(**{**base, "failures": ["EPERM"], "pending": True}) == ("error", "EPERM")
    assert endpoint_status(**{**base, "corrupt": "x: bad"})[0] == "error"
    assert endpoint_status(**{**base, "policy_error": "refused", "policy_covers": False})[0] == "down"
    assert endpoint_status(**{**base, "policy_error": "refused"}) == ("error", "policy not programmed: refused")
    assert endpoint_status(**{**base, "present": False, "conflict": "conflict: x held by y"})[0] == "conflict"
    assert endpoint_status(**{**base, "present": False}) == ("down", "interface tap1 not present")


def test_host_links_are_lo_the_fabric_address_s_and_the_peers_links() -> None:
    def peer(name: str, **spec: object) -> object:
        return validate({"kind": "BGPPeer", "metadata": {"name": name}, "spec": {"asn": 65100, **spec}})

    recs = [host("h1", 1), host("h2", 2), peer("named", interface="en7", peer_ip="fe80::1"),
            peer("by-address", peer_ip="10.1.0.1"), peer("elsewhere", peer_ip="10.9.0.1", host="h2")]
    held = [("en0", "2001:db8::1/128"), ("en1", "10.1.0.0/31"), ("en2", "10.9.0.2/24"), ("en3", "fe80::5/64"),
            ("en4", "2001:db8::2/64")]
    # en2 holds the subnet of h2's own peer, not h1's; en4 h2's address (its subnet is no peer's)
    assert host_links("h1", recs, held) == ("en0", "en1", "en7", "lo")
    assert host_links("h2", recs, held) == ("en1", "en2", "en4", "en7", "lo")
