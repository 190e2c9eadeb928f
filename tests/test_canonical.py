"""The agent's canonical Endpoint path (tabby.model.canonical) against the full model: it takes a
record only when the model takes it, with the same value, and takes whatever the model writes."""

from __future__ import annotations

import json
from socket import AF_INET6, inet_ntop
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_light import documents, endpoints, full

from tabby.agent.agent import decode_record
from tabby.model import InvalidResource, canonical, encode
from tabby.model.keys import endpoint_key

# addresses the model refuses or writes otherwise, inside an address list
HOSTILE_V6 = st.sampled_from(["fe80::5/128", "::ffff:10.0.0.1/128", "::ffff:a00:1/128", "ff02::1/128", "::/128",
                              "::1/128", "fd00:e::5/128", "FD00:E::5/128", "fd00:e:0::5/128", "fd00:e::5/64",
                              "fd00:e::5%eth0/128", "fd00:e::5", "::1.2.3.4/128", 5, None])
HOSTILE_V4 = st.sampled_from(["0.0.0.0/32", "224.0.0.1/32", "240.0.0.1/32", "169.254.0.5/32", "127.0.0.1/32",
                              "0.1.2.3/32", "10.64.0.5/32", "010.64.0.5/32", "10.64.0.5/24", "10.64.0.5", 5])


def check(key: str, raw: bytes) -> None:
    model = full(key, raw)
    got = canonical.endpoint(key, raw)
    if got is not None:
        assert not isinstance(model, InvalidResource), (raw, model)
        assert got == model and model == got
        assert got.model_dump_json() == model.model_dump_json()
    answer = decode_record(key, raw) if not isinstance(model, InvalidResource) else None
    if answer is not None:
        assert answer == model
    # what the model writes, this path takes; but allowed sources, scoped addresses ("%zone", which
    # the model takes in an address list) and IPv4-mapped ones (which ipaddress writes otherwise
    # than the kernel), which it leaves to the model on purpose
    if not isinstance(model, InvalidResource) and model.kind == "Endpoint" and not model.spec.allowed_sources \
            and b"%" not in encode(model) \
            and not any("." in inet_ntop(AF_INET6, a.packed) for a in model.spec.ipv6_addresses):
        assert canonical.endpoint(key, encode(model)) == model, encode(model)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.booleans())
def test_canonical_takes_only_what_the_model_takes_with_the_same_value(
        case: tuple[str, str, dict[str, Any]], spaced: bool) -> None:
    _, key, doc = case
    check(key, json.dumps(doc, separators=(", ", ": ") if spaced else (",", ":")).encode())


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(endpoints(), st.lists(HOSTILE_V6, max_size=2), st.lists(HOSTILE_V4, max_size=2), st.booleans())
def test_hostile_addresses_and_the_models_own_bytes(spec: dict[str, Any], v6: list[Any], v4: list[Any],
                                                    port_security: bool) -> None:
    doc = {"kind": "Endpoint", "metadata": {"name": "e1", "labels": {"app": "web"}},
           "spec": {**spec, "ipv6_addresses": v6 + spec.get("ipv6_addresses", []),
                    "ipv4_addresses": v4 + spec.get("ipv4_addresses", []), "port_security": port_security}}
    host = spec.get("host")
    key = endpoint_key(host if isinstance(host, str) and host and "/" not in host else "h1", "e1")
    check(key, json.dumps(doc, separators=(",", ":")).encode())
    model = full(key, json.dumps(doc).encode())
    if not isinstance(model, InvalidResource):
        check(key, encode(model))


def test_bytes_other_than_the_encoders_take_the_full_path() -> None:
    """Each differs from what the encoder writes in one way the values alone would not show."""
    doc = {"kind": "Endpoint", "metadata": {"name": "e1", "labels": {"a": "1", "b": "2"}},
           "spec": {"host": "h1", "orchestrator": "container", "workload_id": "w1", "interface": "tby1",
                    "mac": "ee:ee:ee:ee:ee:ee", "ipv6_addresses": ["fd00:e::5/128"], "ipv4_addresses": [],
                    "ipv6_gateway": "fe80::1", "ipv4_gateway": None, "profiles": ["p"], "allowed_sources": [],
                    "port_security": True}}
    key = endpoint_key("h1", "e1")
    raw = encode(full(key, json.dumps(doc).encode()))
    assert canonical.endpoint(key, raw) is not None
    assert canonical.endpoint(endpoint_key("h1", "e2"), raw) is None  # a key naming another
    assert canonical.endpoint(endpoint_key("h2", "e1"), raw) is None  # a key under another host
    variants = [
        raw.replace(b'"kind":"Endpoint",', b'"kind":"Endpoint","kind":"Endpoint",'),  # a duplicate key
        raw.replace(b'"host":"h1",', b'"host":"h1","host":"h1",'),
        raw.replace(b'"workload_id":"w1"', b'"workload_id":"w1\\n"'),  # Python's $ would take it
        raw.replace(b'"a":"1","b":"2"', b'"b":"2","a":"1"'),  # labels not sorted
        raw.replace(b'"w1"', b'"\\u0077\\u0031"'),  # an escape
        raw + b"\n", b" " + raw, raw.replace(b",", b", ", 1),
        raw.replace(b'"port_security":true', b'"port_security":1'),
        raw.replace(b'"ipv6_gateway":"fe80::1"', b'"ipv6_gateway":"fe80::1%eth0"'),
        raw.replace(b',"port_security":true', b""),  # a field left to its default
        raw.replace(b"tby1", b"tby1" * 5),  # an interface name too long
        # where the json module and orjson (this path's parser) part ways: it refuses what json
        # takes, and the full decoder decides
        raw.replace(b'"port_security":true', b'"port_security":NaN'),
        raw.replace(b'"port_security":true', b'"port_security":' + b"9" * 30),
        raw.replace(b'"w1"', b'"w1\\ud800"'),  # a lone surrogate
        raw.replace(b'"w1"', b'"w\\u00e91"'), raw.replace(b'"w1"', '"w\u00e91"'.encode()),  # not ASCII
    ]
    for v in variants:
        assert canonical.endpoint(key, v) is None, v
        check(key, v)
    # escapes the model itself writes in a workload id (any printable ASCII): the same bytes either way
    for wid in ('w"1', "w\\1", "w/1<&>"):
        raw2 = encode(full(key, json.dumps({**doc, "spec": {**doc["spec"], "workload_id": wid}}).encode()))
        got = canonical.endpoint(key, raw2)
        assert got is not None and got.spec.workload_id == wid, raw2
        check(key, raw2)
    for corrupt in (b"", b"{", b"\xff", b"[]", b"null", b'{"kind":"Endpoint"}', raw[:-1], b"[" * 100_000):
        assert canonical.endpoint(key, corrupt) is None
        try:
            decode_record(key, corrupt)
        except InvalidResource as e:
            assert key in str(e)
        else:
            raise AssertionError(corrupt)
