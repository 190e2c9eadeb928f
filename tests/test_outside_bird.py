"""The lab's outside router config: a golden text with documentation prefixes, which a real
``bird -p`` accepts (as it accepts the IPv6-only one)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bird_config import bird_accepts

from tabby.lab.outside_bird import Neighbour, render

GOLDEN = """router id 192.0.2.254;
protocol device {}
protocol direct lo6 { ipv6; interface "lo"; }
protocol kernel k6 { ipv6 { import none; export where source = RTS_BGP; }; }
protocol direct lo4 { ipv4; interface "lo"; }
protocol kernel k4 { ipv4 { import none; export where source = RTS_BGP; }; }
protocol bgp h1v6 { local 2001:db8::fe as 65100; neighbor 2001:db8::1 as 64512; connect delay time 1; \
ipv6 { import all; export where proto = "lo6"; }; }
protocol bgp h1v4 { local 192.0.2.254 as 65100; neighbor 192.0.2.1 as 64512; connect delay time 1; \
ipv4 { import all; export where proto = "lo4"; }; }
"""


def test_dual_stack_golden(tmp_path: Path) -> None:
    text = render("192.0.2.254", 65100, "2001:db8::fe", "192.0.2.254", [Neighbour(1, "2001:db8::1", "192.0.2.1")])
    assert text == GOLDEN
    bird_accepts(text, tmp_path)


def test_ipv6_only_has_no_ipv4_at_all(tmp_path: Path) -> None:
    text = render("192.0.2.254", 65100, "2001:db8::fe", None, [Neighbour(1, "2001:db8::1", None)])
    assert "ipv4" not in text and "h1v6" in text
    bird_accepts(text, tmp_path)


def test_only_addresses_reach_the_config() -> None:
    with pytest.raises(ValueError):
        render("192.0.2.254", 65100, "2001:db8::fe; }", None, [])
