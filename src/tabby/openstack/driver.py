"""The Neutron ML2 mechanism driver (entry point ``tabby`` in ``neutron.ml2.mechanism_drivers``).

Runs inside neutron-server, so it imports neutron-lib; everything it decides is in
``translate.py`` (pure) and ``sync.py``. What it does:

- binds ports on hosts that run tabby (a Host record in the Store) with VIF type ``tap``;
- writes an Endpoint for each bound port after every commit that touches it (new fixed IPs, a new
  host after live migration), deletes it on unbind or delete;
- subnets -> IPPools; IPv6 subnets that are not DHCPv6-stateful are refused before commit, and so
  are allowed address pairs that are networks, not single addresses;
- security groups -> Profiles, re-read from Neutron after any change to a group or a rule;
- port status ACTIVE/DOWN from the agents' endpoint status, polled every STATUS_S seconds;
- a resync of Neutron into the Store at start (and ``tabby openstack resync`` on demand).

Store writes happen in postcommit, never inside Neutron's transaction: a Store that is down makes
a port's Endpoint late (the next resync or update writes it), never a Neutron API call fail.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from neutron_lib import constants as n_const
from neutron_lib import context as n_context
from neutron_lib import exceptions as n_exc
from neutron_lib.api.definitions import portbindings
from neutron_lib.callbacks import events, registry, resources
from neutron_lib.plugins import directory
from neutron_lib.plugins.ml2 import api
from oslo_config import cfg

from tabby.client import ResourceClient
from tabby.model import validate
from tabby.model.codec import InvalidResource
from tabby.model.keys import STATUS_PREFIX, endpoint_status_key
from tabby.model.status import decode_status
from tabby.openstack import translate
from tabby.openstack.sync import reconcile
from tabby.store import ETCD_OPTIONS, NotFound, StoreError, open_store, store_url, with_etcd_options

log = logging.getLogger(__name__)
_REPORTED: set[tuple[str, int]] = set()  # corrupt status records already logged (key, revision)

STATUS_S = 2.0
OPTS = [cfg.StrOpt("store_url", help="tabby Store URL (sqlite:///..., etcd://host:port[,host:port...] or "
                   "etcds://... with TLS); default $TABBY_STORE"),
        *(cfg.StrOpt(f"etcd_{k}", help=f"etcd: the URL's {k}= (default ${var})") for k, var in ETCD_OPTIONS.items())]
cfg.CONF.register_opts(OPTS, "tabby")


class TabbyMechanismDriver(api.MechanismDriver):
    def initialize(self) -> None:
        url = with_etcd_options(store_url(cfg.CONF.tabby.store_url or None),  # oslo reads "store_url =" as ""
                                **{k: getattr(cfg.CONF.tabby, f"etcd_{k}") or None for k in ETCD_OPTIONS})
        self.client = ResourceClient(open_store(url))
        self.bound: dict[str, tuple[str, str]] = {}  # port id -> (host, last status we set)
        self.lock = threading.Lock()
        for resource in (resources.SECURITY_GROUP, resources.SECURITY_GROUP_RULE):
            for event in (events.AFTER_CREATE, events.AFTER_UPDATE, events.AFTER_DELETE):
                registry.subscribe(self._security_groups_changed, resource, event)
        threading.Thread(target=self._background, name="tabby-status", daemon=True).start()
        log.info("tabby mechanism driver on store %s", self.client.store)

    # -- subnets ---------------------------------------------------------------------------

    def create_subnet_precommit(self, context: Any) -> None:
        self._check_subnet(context.current)

    def update_subnet_precommit(self, context: Any) -> None:
        self._check_subnet(context.current)

    def _check_subnet(self, subnet: dict[str, Any]) -> None:
        try:
            translate.check_subnet(subnet)
        except (translate.Unsupported, translate.Malformed) as e:
            raise n_exc.InvalidInput(error_message=str(e)) from None

    def create_subnet_postcommit(self, context: Any) -> None:
        self._write_translated(translate.pool_doc, context.current)

    def update_subnet_postcommit(self, context: Any) -> None:
        self._write_translated(translate.pool_doc, context.current)

    def delete_subnet_postcommit(self, context: Any) -> None:
        self._delete("IPPool", translate.pool_name(context.current["id"]))

    # -- ports -----------------------------------------------------------------------------

    def bind_port(self, context: Any) -> None:
        host = context.host
        try:
            runs_tabby = self.client.get("Host", host) is not None
        except (StoreError, ValueError) as e:
            log.warning("cannot bind port %s on %s: store: %s", context.current["id"], host, e)
            return
        if not runs_tabby:
            return  # another driver may bind it
        for segment in context.segments_to_bind:
            if segment[api.NETWORK_TYPE] in (n_const.TYPE_FLAT, n_const.TYPE_LOCAL):
                context.set_binding(segment[api.ID], portbindings.VIF_TYPE_TAP,
                                    {portbindings.CAP_PORT_FILTER: True})
                return

    def create_port_precommit(self, context: Any) -> None:
        self._check_port(context.current)

    def update_port_precommit(self, context: Any) -> None:
        self._check_port(context.current)

    def _check_port(self, port: dict[str, Any]) -> None:
        try:
            translate.check_port(port)
        except (translate.Unsupported, translate.Malformed) as e:
            raise n_exc.InvalidInput(error_message=str(e)) from None

    def create_port_postcommit(self, context: Any) -> None:
        self._port(context.current)

    def update_port_postcommit(self, context: Any) -> None:
        self._port(context.current)

    def delete_port_postcommit(self, context: Any) -> None:
        with self.lock:
            self.bound.pop(context.current["id"], None)
        self._delete("Endpoint", translate.endpoint_name(context.current["id"]))

    def _port(self, port: dict[str, Any]) -> None:
        try:
            doc = translate.endpoint_doc(port)
        except translate.Malformed as e:
            log.error("Neutron port not translated (the tabby store keeps what it had for it): %s", e)
            return
        name = translate.endpoint_name(port["id"])
        if doc is None:
            with self.lock:
                self.bound.pop(port["id"], None)
            self._delete("Endpoint", name)
            return
        with self.lock:
            old = self.bound.get(port["id"])
            self.bound[port["id"]] = (doc["spec"]["host"], old[1] if old and old[0] == doc["spec"]["host"] else "")
        self._write(doc)

    # -- security groups -------------------------------------------------------------------

    def _security_groups_changed(self, resource: str, event: str, trigger: Any, payload: Any = None) -> None:
        """Any change to a group or a rule: every group is read again (they are few) and written."""
        try:
            plugin = directory.get_plugin()
            groups = plugin.get_security_groups(n_context.get_admin_context())
        except Exception:
            log.exception("reading security groups after %s %s", resource, event)
            return
        wanted = set()
        for sg in groups:
            problems: list[str] = []
            if isinstance(sg.get("id"), str):
                wanted.add(translate.profile_name(sg["id"]))  # kept as it is if it cannot be read now
            self._write_translated(translate.profile_doc, sg, problems)
            for text in problems:
                log.error("Neutron security group rule not translated: %s", text)
        try:
            for prof in self.client.list("Profile")[0]:
                if prof.metadata.labels.get(translate.OWNER_LABEL) == "sg" and prof.metadata.name not in wanted:
                    self._delete("Profile", prof.metadata.name)
        except StoreError as e:
            log.error("tabby store: %s", e)

    # -- status and resync -----------------------------------------------------------------

    def _background(self) -> None:
        # neutron-server finishes loading its models after the drivers initialize: until it has,
        # the plugin's queries fail, so the first resync is retried; and for as long as it takes
        # (every 30 s after the first minute): only it writes the no-port-security Profile and mends
        # what changed while the Store was away, so giving up left that undone until an operator ran it
        attempt = 0
        while True:
            time.sleep(1.0 if attempt < 60 else 30.0)
            try:
                self.resync()
                break
            except Exception as e:
                (log.warning if attempt > 10 else log.debug)("resync not possible yet (attempt %d): %s", attempt + 1, e)
            attempt += 1
        while True:
            try:
                self._statuses()
            except Exception:
                log.exception("port status update failed")
            time.sleep(STATUS_S)

    def resync(self) -> dict[str, int]:
        ctx = n_context.get_admin_context()
        plugin = directory.get_plugin()
        before = self.client.store.revision()  # what the driver writes while Neutron is listed is newer
        ports = plugin.get_ports(ctx)
        counts = reconcile(self.client, plugin.get_subnets(ctx), ports, plugin.get_security_groups(ctx),
                           listed_after=before)
        with self.lock:
            for p in ports:
                try:
                    doc = translate.endpoint_doc(p)
                except translate.Malformed:
                    continue  # reconcile has said so
                if doc is not None:
                    self.bound.setdefault(p["id"], (doc["spec"]["host"], ""))
        log.info("resynced Neutron into the tabby store: %s", counts)
        return counts

    def _statuses(self) -> None:
        """One read of every endpoint status per round (not one per port), then only the ports
        whose status changed are written to Neutron."""
        with self.lock:
            bound = dict(self.bound)
        if not bound:
            return
        states: dict[str, str | None] = {}
        for kv in self.client.store.list(f"{STATUS_PREFIX}endpoints/")[0]:
            try:
                states[kv.key] = decode_status(kv.key, kv.value).state
            except InvalidResource as e:
                if (kv.key, kv.mod_revision) not in _REPORTED:  # once per version, not once per round
                    _REPORTED.add((kv.key, kv.mod_revision))
                    log.warning("tabby: corrupt status record %s ignored: %s", kv.key, e)
        plugin, ctx = directory.get_plugin(), n_context.get_admin_context()
        for port_id, (host, last) in bound.items():
            state = states.get(endpoint_status_key(host, translate.endpoint_name(port_id)))
            status = n_const.PORT_STATUS_ACTIVE if state == "up" else n_const.PORT_STATUS_DOWN
            if status != last:
                plugin.update_port_status(ctx, port_id, status, host)
                with self.lock:
                    if port_id in self.bound:
                        self.bound[port_id] = (host, status)

    # -- Store writes ----------------------------------------------------------------------

    def _write_translated(self, make: Any, *args: Any) -> None:
        try:
            doc = make(*args)
        except translate.Malformed as e:
            log.error("Neutron record not translated (the tabby store keeps what it had for it): %s", e)
            return
        self._write(doc)

    def _write(self, doc: dict[str, Any]) -> None:
        try:
            self.client.apply(validate(doc))
        except ValueError as e:
            log.error("Neutron %s %s cannot be expressed in tabby: %s", doc["kind"], doc["metadata"]["name"], e)
        except StoreError as e:
            log.error("tabby store unavailable, %s %s not written (a resync will): %s", doc["kind"],
                      doc["metadata"]["name"], e)

    def _delete(self, kind: str, name: str) -> None:
        try:
            self.client.delete(kind, name)
        except NotFound:
            pass
        except StoreError as e:
            log.error("tabby store unavailable, %s %s not deleted (a resync will): %s", kind, name, e)
