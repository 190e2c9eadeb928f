"""VMs as real qemu guests in the lab (``tabby lab up --vm-kind qemu``).

Each guest boots a qcow2 overlay of a configured image (guest_image: Debian packages plus only
what ``tabby guest render --root`` writes) under qemu, run in its host's namespace on a tap there
(``-netdev tap,ifname=TAP,script=no,downscript=no``), with the MAC of its Endpoint. The tap lives in
the lab host's namespace, so nothing the guest sends can reach this machine's own network.

The lab talks to the guest through the lab's guest agent on a virtio-serial port (a unix socket
here, guest_agent.py inside): the matrix's ping and TCP checks, the guest's addresses, `tabby
guest check`. The serial console is logged to console-NAME.log in the lab directory.

Processes: each qemu is started by the lab and its pid written to qemu-NAME.pid; `lab down` (and
``stop``) end it by that pid, after checking /proc that the pid is still that qemu.

Concurrency: one lock per guest around its agent socket (one request at a time, as the agent
serves them); the matrix's threads queue on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabby.lab import guest_image, netns
from tabby.lab.topology import TCP_PORT, LabVm
from tabby.model.names import check_interface_name

if TYPE_CHECKING:
    from tabby.lab.lab import Lab

# TCG, not KVM: /dev/kvm exists on this machine but KVM guests hung right after the BIOS
# ("Probing EDD"); TABBY_QEMU_ACCEL=kvm where a probe boot has shown that KVM works.
ACCEL = os.environ.get("TABBY_QEMU_ACCEL", "tcg")
MEMORY_MB = 384  # the budget is 512 per test guest; a minbase Debian boots in well under 256
KINDS = ("netns", "qemu")
MAX_REPLY = 4 << 20  # bytes of one agent reply: the guest is not trusted to bound its own output
# which image flavour a lab VM boots: a VM made as LabVm(host, i, "ifupdown" | "networkd") says
# so; one of topology's (client dhclient or dhcpcd) alternates by host and index, so that
# `lab up --vm-kind qemu --vms 1` has both flavours on its first two hosts
FLAVOUR_OF_CLIENT = {"ifupdown": "ifupdown", "networkd": "networkd"}
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# root on NVMe: its driver and ext4 are built into Debian's cloud kernel, so no initrd (virtio-blk
# is a module: an initrd to unpack and a udev inside it, ~5 s of a TCG boot). quiet: every console
# byte costs under TCG, but systemd still says what each unit did; no_timer_check: the kernel's
# IO-APIC timer check fails on a loaded host under TCG ("IO-APIC + timer doesn't work", a panic);
# mitigations=off: a lab guest runs only the lab's code, and page-table isolation's address-space
# switch on every system call and interrupt is a TLB flush, dear under TCG
APPEND = ("root=/dev/nvme0n1 rw console=ttyS0 net.ifnames=0 panic=-1 quiet systemd.show_status=1 no_timer_check "
          "mitigations=off")


def flavour_of(v: LabVm) -> str:
    if v.client in FLAVOUR_OF_CLIENT:
        return FLAVOUR_OF_CLIENT[v.client]
    if v.client in ("dhclient", "dhcpcd"):
        return guest_image.FLAVOURS[(v.host.index + v.index) % 2]
    raise ValueError(f"client: {v.client!r} has no qemu flavour (ifupdown, networkd, or topology's dhclient, "
                     "dhcpcd)")


@dataclass
class Guest:
    """One qemu guest of a lab: what it runs on, and the files it keeps in the lab directory."""

    name: str
    host_ns: str
    tap: str
    mac: str
    flavour: str
    dir: Path
    render: str = "render"  # guest_image.RENDERS: how its image was configured
    ipv4: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _sock: socket.socket | None = field(default=None, repr=False, compare=False)
    _buf: bytes = field(default=b"", repr=False, compare=False)
    _seq: int = field(default=0, repr=False, compare=False)
    _served_boot: str = field(default="", repr=False, compare=False)
    started: float = field(default=0.0, repr=False, compare=False)  # time.monotonic() of the last qemu start

    def __post_init__(self) -> None:
        """Everything here reaches a command line or a path: refused, naming the field, unless plain."""
        if not _NAME.match(self.name):
            raise ValueError(f"name: {self.name!r} is not a plain name")
        check_interface_name(self.tap)
        if not _MAC.match(self.mac):
            raise ValueError(f"mac: {self.mac!r} is not a lower-case MAC address")
        if self.flavour not in guest_image.FLAVOURS:
            raise ValueError(f"flavour: {self.flavour!r} is not one of {', '.join(guest_image.FLAVOURS)}")
        guest_image.render_args(self.flavour, self.ipv4, render=self.render)  # ValueError naming render
        if "," in str(self.dir):  # qemu's option syntax splits at commas
            raise ValueError(f"dir: {self.dir} has a comma")

    # files
    @property
    def disk(self) -> Path:
        return self.dir / f"disk-{self.name}.qcow2"

    @property
    def console(self) -> Path:
        return self.dir / f"console-{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / f"qemu-{self.name}.pid"

    @property
    def agent_socket(self) -> Path:
        return self.dir / f"agent-{self.name}.sock"

    @property
    def record(self) -> Path:
        return self.dir / f"qemu-{self.name}.json"

    def save(self) -> None:
        self.record.write_text(json.dumps({"name": self.name, "host_ns": self.host_ns, "tap": self.tap,
                                           "mac": self.mac, "flavour": self.flavour, "render": self.render,
                                           "ipv4": self.ipv4}))

    @classmethod
    def load(cls, path: Path) -> Guest:
        r = json.loads(path.read_text())
        return cls(str(r["name"]), str(r["host_ns"]), str(r["tap"]), str(r["mac"]), str(r["flavour"]), path.parent,
                   str(r.get("render", "render")), bool(r.get("ipv4", True)))

    # life
    def argv(self, image: guest_image.Image) -> list[str]:
        return ["qemu-system-x86_64", "-name", self.name, "-accel", ACCEL, "-m", str(MEMORY_MB), "-smp", "1",
                "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
                "-kernel", str(image.kernel), "-append", APPEND,
                # cache=unsafe: the guest's flushes are not the host's fsyncs; the overlay is the VM's
                # own, thrown away with the lab (a host crash loses it; a qemu exit or reboot does not)
                "-drive", f"file={self.disk},if=none,id=root,format=qcow2,cache=unsafe",
                "-device", "nvme,drive=root,serial=root",
                "-netdev", f"tap,id=net0,ifname={self.tap},script=no,downscript=no",
                # romfile= : no iPXE option ROM for the BIOS to load (qemu boots the kernel itself)
                "-device", f"virtio-net-pci,netdev=net0,mac={self.mac},romfile=",
                "-serial", f"file:{self.console}",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=agent,path={self.agent_socket},server=on,wait=off",
                "-device", f"virtserialport,chardev=agent,name={guest_image.AGENT_PORT}",
                "-pidfile", str(self.pid_file)]

    def image(self) -> guest_image.Image:
        return guest_image.configured(self.flavour, self.ipv4, render=self.render)

    def start(self, fresh_disk: bool = False) -> float:
        """Boot the guest (a new overlay when it has none, or fresh_disk); returns time.monotonic()
        at the qemu start, for boot timings."""
        img = self.image()
        if fresh_disk or not self.disk.exists():
            self.disk.unlink(missing_ok=True)
            guest_image.overlay(img, self.disk)
        if self.tap not in netns.ip("-o", "link", "show", ns=self.host_ns):
            netns.ip("tuntap", "add", "dev", self.tap, "mode", "tap", ns=self.host_ns)
        netns.ip("link", "set", self.tap, "up", ns=self.host_ns)
        self.agent_socket.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)
        self.save()
        t0 = self.started = time.monotonic()
        log = self.dir / f"qemu-{self.name}.log"
        netns.spawn(self.host_ns, self.argv(img), log)
        try:
            netns.wait_for(lambda: self.pid() is not None and self.agent_socket.exists(), 20, 0.05,
                           f"qemu {self.name}")
        except TimeoutError as e:  # qemu says why it did not start (a lock, a tap) in its log
            raise TimeoutError(f"{e}; {log}: {log.read_text(errors='replace')[-1000:]}") from None
        return t0

    def pid(self) -> int | None:
        """The pid of this guest's qemu, if it is still running (checked in /proc, not trusted)."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        return pid if cmd and cmd[0].endswith(b"qemu-system-x86_64") and str(self.disk).encode() in \
            b"\0".join(cmd) else None

    def stop(self, timeout: float = 10.0) -> None:
        """End the qemu by its pid (TERM, then KILL)."""
        self._close()
        pid = self.pid()
        if pid is None:
            return
        netns.kill_pid(pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and self.pid() is not None:
            time.sleep(0.05)
        if self.pid() is not None:
            netns.kill_pid(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)

    def delete_tap(self) -> None:
        with contextlib.suppress(Exception):
            netns.ip("link", "del", self.tap, ns=self.host_ns)

    # the agent
    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock, self._buf = None, b""

    def call(self, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """One request to the guest agent; OSError (TimeoutError) when it does not answer in time."""
        with self._lock:
            return self._call(req, timeout)

    def _call(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.agent_socket))
            except OSError:
                s.close()
                raise
            self._sock = s
        self._seq += 1
        req = {**req, "id": self._seq}
        deadline = time.monotonic() + timeout
        try:
            self._sock.sendall((json.dumps(req) + "\n").encode())
            while True:
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    with contextlib.suppress(ValueError):
                        reply = json.loads(line)
                        if isinstance(reply, dict) and reply.get("id") == self._seq:
                            return reply
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"guest agent of {self.name}: no answer in {timeout:.0f} s")
                self._sock.settimeout(left)
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"guest agent of {self.name}: qemu closed the socket")
                self._buf += chunk
                if len(self._buf) > MAX_REPLY:
                    raise ConnectionError(f"guest agent of {self.name}: a reply over {MAX_REPLY} bytes")
        except OSError:
            self._close()  # a reply that comes late must not be read as the next one's
            raise

    def ready(self, timeout: float = 1.0) -> bool:
        """The agent answers (the guest has booted as far as multi-user); starts the guest's TCP
        listener once per boot, as the lab starts socat in namespaces."""
        try:
            hello = self.call({"op": "hello"}, timeout)
            if hello.get("boot_id") != self._served_boot:
                self.call({"op": "serve", "port": TCP_PORT, "text": self.name}, 10)
                self._served_boot = str(hello.get("boot_id"))
            return bool(hello.get("ok"))
        except OSError:
            return False

    def wait_ready(self, timeout: float = 180.0) -> None:
        netns.wait_for(lambda: self.ready(2.0), timeout, 0.5, f"guest agent of {self.name} (see {self.console})")

    def wait_booted(self, timeout: float = 180.0) -> str:
        """Until systemd says the boot is over (``is-system-running --wait``: running, or degraded
        when a unit failed), which under ifupdown includes networking.service, that is the DHCP
        clients' first leases; returns systemd's word."""
        self.wait_ready(timeout)
        return str(self.run(["systemctl", "is-system-running", "--wait"], timeout).get("out", "")).strip()

    def wait_up(self, timeout: float = 240.0) -> None:
        """Until the boot is over and eth0 can carry traffic in IPv6: what `lab up` waits for before
        its matrix (the agent answers well before the guest's DHCP clients are done, and a DHCPv6
        address can be there, or still tentative, before the first RA has given a default route)."""
        deadline = time.monotonic() + timeout
        self.wait_booted(timeout)
        netns.wait_for(self.usable, max(1.0, deadline - time.monotonic()), 0.5,
                       f"a usable IPv6 address and a default route in guest {self.name} (see {self.console})")

    def usable(self) -> bool:
        """eth0 has a global IPv6 address past DAD and an IPv6 default route."""
        try:
            addrs = self.ip_json("-6", "addr", "show", "dev", "eth0")
            routes = self.ip_json("-6", "route", "show", "default", "dev", "eth0")
        except (OSError, ValueError):
            return False
        info = addrs[0].get("addr_info", []) if addrs and isinstance(addrs[0], dict) else []
        done = [a for a in info if a.get("scope") == "global" and not a.get("tentative") and not a.get("dadfailed")]
        return bool(done) and bool(routes)

    def run(self, argv: list[str], timeout: float = 30.0) -> dict[str, Any]:
        return self.call({"op": "run", "argv": argv, "timeout": timeout}, timeout + 5)

    def ping(self, address: str, timeout: float = 2.0) -> tuple[bool, str]:
        """One ping from inside the guest (its own ping, its own routes)."""
        try:
            self.ready(5)
            fam = "-6" if ":" in address else "-4"
            r = self.run(["ping", fam, "-c", "1", "-W", str(max(1, int(timeout))), "-n", address], timeout + 5)
        except OSError as e:
            return False, f"guest agent: {e}"
        return r.get("rc") == 0, (r.get("out", "") + r.get("err", "")).strip()[-300:]

    def tcp(self, address: str, port: int, timeout: float = 2.0) -> tuple[bool, str]:
        try:
            self.ready(5)
            r = self.call({"op": "tcp", "addr": address, "port": port, "timeout": timeout}, timeout + 5)
        except OSError as e:
            return False, f"guest agent: {e}"
        return bool(r.get("ok")), str(r.get("out", ""))

    def addresses(self, timeout: float = 10.0) -> dict[str, list[str]]:
        """The guest's global addresses on eth0, as the guest's own kernel has them (none while its
        agent does not answer)."""
        try:
            r = self.call({"op": "run", "argv": ["ip", "-j", "addr", "show", "dev", "eth0"], "timeout": timeout},
                          timeout)
            info = json.loads(r.get("out") or "[]")[0].get("addr_info", [])
        except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):  # what the guest said
            return {"v6": [], "v4": []}
        return {"v6": [a["local"] for a in info if a["family"] == "inet6" and a["scope"] == "global"],
                "v4": [a["local"] for a in info if a["family"] == "inet"]}

    def ip_json(self, *args: str) -> list[dict[str, Any]]:
        r = self.run(["ip", "-j", *args], 10)
        return json.loads(r.get("out") or "[]")

    def check(self) -> dict[str, Any]:
        """`tabby guest check` inside the guest (tabby's guest package, on the guest's python3)."""
        return self.run(["env", f"PYTHONPATH={guest_image.CHECK_DIR}", "python3", "-m", "tabby.guest.check", "eth0"],
                        30)


def guest_for(lab: Lab, v: LabVm, render: str = "render") -> Guest:
    return Guest(v.name, v.host.ns, v.tap, v.mac.lower(), flavour_of(v), lab.dir, render, lab._v4(v))


def add_vm(lab: Lab, v: LabVm, addresses: tuple[str, ...] = (), orchestrate: bool = True,
           render: str = "render") -> Guest:
    """A qemu VM in the lab: the orchestrator's allocation and Endpoint, the tap, and the guest booted
    (not waited for: ``Guest.wait_ready``)."""
    g = guest_for(lab, v, render)
    if orchestrate:
        lab._orchestrate_vm(v, addresses)
    lab.guests[v.name] = g
    g.start()
    return g


def remove_vm(lab: Lab, v: LabVm) -> None:
    g = lab.guests.pop(v.name, None)
    if g is not None:
        g.stop()
        g.delete_tap()
        for f in (g.disk, g.record, g.agent_socket):
            f.unlink(missing_ok=True)


def load_guests(directory: Path) -> dict[str, Guest]:
    """The guests a lab directory records (for a lab loaded by the CLI after `lab up`)."""
    out = {}
    for p in sorted(directory.glob("qemu-*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):  # any bytes:
            g = Guest.load(p)  # a record that is no object must not stop `lab down` before its sweep
            out[g.name] = g
    return out


def stop_all(directory: Path) -> list[str]:
    """End every qemu the lab directory records, by pid (`lab down`); the names of those ended."""
    ended = []
    if not directory.is_dir():
        return ended
    for g in load_guests(directory).values():
        if g.pid() is not None:
            g.stop()
            ended.append(g.name)
    return ended
