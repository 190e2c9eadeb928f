"""The policy reconciler: keeps the kernel's ``inet tabby`` table equal to the PolicyIndex.

Two write paths, both atomic:
- replace: when the structure (chains, rules, sets) changed, at start, after a failed patch, or
  after drift — one nfnetlink transaction (``nft_encode``: the bytecode libnftables would send,
  without its 0.4 s of userspace at 10,000 endpoints) that deletes whatever table is there and
  adds the whole desired one, elements included. Packets see the old table or the new one, never
  a mix. A shape the encoder does not know, or a batch the kernel refuses, is written again
  through libnftables (JSON), logged; its error is the one reported.
- patch: when only set elements changed (endpoints came and went) — one nfnetlink batch.

Drift: the ruleset generation id moves with every nf_tables transaction. If it moved since our
last write, someone else wrote (any table); the table is then listed and compared with what we
wrote — chains and their hooks, each chain's rule comments in order, every set's elements — and
replaced if anything differs.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Set as AbstractSet
from typing import Any

import nftables

from tabby.dataplane.nft_encode import Unsupported, replace_messages
from tabby.dataplane.nft_netlink import NftError, NftSocket
from tabby.dataplane.nft_rules import FAMILY, TABLE, render, replace_text
from tabby.dataplane.nft_structure import DesiredPolicy, Element, Structure

log = logging.getLogger(__name__)


class PolicyReconciler:
    def __init__(self) -> None:
        self.nft = nftables.Nftables()
        self.nft.set_json_output(True)
        self.nft.set_stateless_output(True)
        self.sock = NftSocket()
        self.structure: Structure | None = None
        self.chains: dict[str, list[str]] = {}  # chain -> rule comments, as written
        self.base: dict[str, tuple[Any, ...]] = {}  # base chain -> (type, hook, prio, policy)
        self.gen: int | None = None
        self.replace_due = True
        self.last_error: str | None = None
        self.replaces = 0
        self.patches = 0
        self.drift_restored = 0

    def close(self) -> None:
        self.sock.close()

    def apply(self, index: DesiredPolicy) -> bool:
        """Bring the kernel to the index's state; False if it failed (the caller retries)."""
        s = index.structure()
        delta = index.take_delta()
        if self.replace_due or s != self.structure:
            return self._replace(index)
        if not delta:
            return True
        types = s.set_names()
        changes: list[tuple[bool, str, Any, list[Element]]] = []
        for add in (False, True):
            for name, elems in delta.items():
                picked = sorted(e for e, present in elems.items() if present is add)
                if picked and name in types:
                    changes.append((add, name, types[name], picked))
        try:
            self.sock.set_elements(TABLE, changes)
            self.patches += 1
            self.gen = self.sock.generation()
            self.last_error = None
            return True
        except (NftError, OSError) as e:
            log.warning("policy: patching set elements failed (%s); replacing the table", e)
            return self._replace(index)

    def _replace(self, index: DesiredPolicy) -> bool:
        s = index.structure()
        # a burst of short-lived objects: a full garbage collection in the middle of it (0.15 s
        # at 10,000 endpoints) would find nothing to free
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            cmds, chains = render(s)
            elements = index.desired_elements()
            rc, err = self._write(cmds, s.set_names(), elements)
        finally:
            if gc_was_on:
                gc.enable()
        if rc != 0:
            self.last_error = f"nftables refused the policy table: {err.strip()[:2000]}"
            log.error("policy: %s", self.last_error)
            self.replace_due = True
            return False
        self.structure, self.chains, self.replace_due = s, chains, False
        self.base = {c["add"]["chain"]["name"]: _base_of(c["add"]["chain"]) for c in cmds
                     if "add" in c and "chain" in c["add"] and "hook" in c["add"]["chain"]}
        self.replaces += 1
        self.last_error = None
        try:
            self.gen = self.sock.generation()
        except (NftError, OSError):
            self.gen = None
        return True

    def _write(self, cmds: list[dict[str, Any]], types: dict[str, Any], elements: dict[str, AbstractSet[Element]]
               ) -> tuple[int, str]:
        """The replace transaction over nfnetlink; through libnftables if that cannot be done."""
        try:
            self.sock.transaction(replace_messages(TABLE, cmds, types, elements))
            return 0, ""
        except Unsupported as e:
            log.warning("policy: the netlink encoder does not know %s; writing through libnftables", e)
        except (NftError, OSError) as e:
            log.warning("policy: the kernel refused the netlink replace (%s); trying libnftables", e)
        rc, _out, err = self.nft.cmd(replace_text(cmds, elements))  # JSON in (json output is on)
        return rc, err

    def check(self, index: DesiredPolicy, force: bool = False) -> bool:
        """Compare the kernel's table with ours if anyone wrote since; replace it if it drifted.

        Returns True when drift was found (and a replace attempted)."""
        if self.structure is None or self.replace_due:
            return False
        try:
            gen = self.sock.generation()
        except (NftError, OSError) as e:
            log.warning("policy: cannot read the ruleset generation: %s", e)
            gen = None
        if not force and gen is not None and gen == self.gen:
            return False
        t0 = time.perf_counter()
        why = self.differences(index)
        log.debug("policy: table compared in %.1f ms", (time.perf_counter() - t0) * 1000)
        if why is None:
            self.gen = gen
            return False
        log.warning("policy: table inet tabby was changed outside tabby (%s); restoring it", why)
        self.drift_restored += 1
        self._replace(index)
        return True

    def differences(self, index: DesiredPolicy) -> str | None:
        """The first way the kernel's table differs from the desired one, or None."""
        rc, out, err = self.nft.json_cmd({"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]})
        if rc != 0:
            return f"table missing ({err.strip()[:200]})"
        chains: dict[str, list[str]] = {}
        base: dict[str, tuple[Any, ...]] = {}
        sets: dict[str, set[Element]] = {}
        for item in (out or {}).get("nftables", []):
            if "chain" in item:
                c = item["chain"]
                chains[c["name"]] = []
                if "hook" in c:
                    base[c["name"]] = _base_of(c)
            elif "rule" in item:
                r = item["rule"]
                chains.setdefault(r["chain"], []).append(r.get("comment", "<no comment>"))
            elif "set" in item:
                st = item["set"]
                sets[st["name"]] = {_elem(e) for e in st.get("elem", [])}
        if chains != self.chains:
            for name in sorted(set(chains) | set(self.chains)):
                if chains.get(name) != self.chains.get(name):
                    return f"chain {name} differs"
        if base != self.base:
            return "a base chain's hook or policy differs"
        desired = index.desired_elements()
        if set(sets) != set(desired):
            return f"sets differ: {sorted(set(sets) ^ set(desired))[:5]}"
        for name, elems in desired.items():
            if sets[name] != elems:
                return f"set {name} differs ({len(sets[name] - elems)} extra, {len(elems - sets[name])} missing)"
        return None


def _base_of(chain: dict[str, Any]) -> tuple[Any, ...]:
    return (chain.get("type"), chain.get("hook"), chain.get("prio"), chain.get("policy"))


def _elem(e: Any) -> Element:
    if isinstance(e, dict) and "concat" in e:
        return tuple(str(x) for x in e["concat"])
    if isinstance(e, dict) and "elem" in e:
        return _elem(e["elem"]["val"])
    return (str(e),)
