"""Guest images for qemu VMs in the lab: Debian from packages (mmdebstrap), the seed's recipe.

The seed's recipe is "launch an image, change its configuration files, snapshot it, use the
snapshot". Here, in three layers, each a file under CACHE_ROOT:

1. the *pristine* image of a flavour: Debian packages only, no network configuration at all (the
   flavour's network stack is installed and enabled, nothing tells it what to do). Built once per
   machine, named by a hash of its package list, recipe and tabby's version: a raw ext4 disk plus
   the kernel taken out of it (qemu boots it directly: no boot loader to install, and no initrd:
   the root disk is NVMe and ext4, both built into Debian's cloud kernel).
2. a *configured* image per configuration (flavour, IPv4 or not, render options): a copy of the
   pristine disk, loop-mounted, written to by ``tabby guest render --root`` and nothing else
   network-related; the lab's guest agent (guest_agent.py, not network configuration: it is how
   the lab runs ping and TCP inside) and tabby's guest checker are installed beside it.
3. per VM, a qcow2 overlay on the configured image: the "snapshot" a VM boots and writes to.

Concurrency: a build takes a lock file per image (flock), so two tests or labs building the same
image wait for one another and then share it; an image is made under a temporary name and renamed
into place, so a crash never leaves a half-built image behind a valid name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tabby

CACHE_ROOT = Path(os.environ.get("TABBY_GUEST_CACHE", "/var/cache/tabby/guest"))
SUITE = "bookworm"
FLAVOURS = ("ifupdown", "networkd")
# What every flavour has: a kernel, systemd with udev (module autoload, /dev/virtio-ports), the
# tools the matrix runs inside (ping, ip) and python3 for the guest agent and `tabby guest check`.
# Debian's cloud kernel: made for virtual machines (virtio, no hardware drivers), a quarter of the
# modules of linux-image-amd64, so a smaller tree, initramfs and disk, and fewer modules for udev to load.
COMMON_PACKAGES = ("systemd-sysv", "udev", "kmod", "iproute2", "iputils-ping", "python3", "linux-image-cloud-amd64")
FLAVOUR_PACKAGES = {
    "ifupdown": ("ifupdown", "isc-dhcp-client"),  # as the seed's Ubuntu 14.04: ISC dhclient under ifupdown
    # systemd-networkd is in the systemd package (enabled, with no .network file); netplan.io renders
    # network-config v2 (cloud images' way to configure it) to networkd at boot, from /etc/netplan
    "networkd": ("netplan.io",),
}
# Documentation and locales are never read by a guest that lives for a test: ~60 MB less to unpack.
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*",
                 "/lib/modules/*.ko")
# ...and of the kernel's modules (~85 MB) only those of the devices qemu gives a guest (lab/qemu.py:
# virtio-net, virtio-serial on virtio-pci; the root disk is NVMe, built in): less to unpack, no
# initrd to make, and nothing else for udev to load at boot under TCG (crypto modules for -cpu
# max's features, ATA for the PC's IDE controller, dm, fuse, loop: ~20 modules before)
MODULES_KEPT = ("drivers/virtio/virtio.ko", "drivers/virtio/virtio_ring.ko", "drivers/virtio/virtio_pci*.ko",
                "drivers/net/virtio_net.ko", "drivers/net/net_failover.ko", "net/core/failover.ko",
                "drivers/char/virtio_console.ko")
DPKG_INCLUDES = tuple(f"/lib/modules/*/kernel/{m}" for m in MODULES_KEPT)
# Units a lab guest never needs, masked in the pristine image: under TCG every process at boot
# costs (~50 s to the agent before, most of it these starting beside the ones that matter). No
# getty (root has no password: the lab talks to the guest agent), no timers (apt, fstrim, e2scrub:
# a guest lives for a test), none of the pseudo file systems, module preloads, utmp, random seed,
# pstore or journal flush (the journal stays in /run); e2scrub_reap checks ext4 snapshots a VM
# never has (it held boot up ~20 s). Networking, udev, journald, sysctl and tmpfiles stay.
MASKED_UNITS = ("getty.target", "getty-static.service", "dev-hugepages.mount", "dev-mqueue.mount",
                "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
                "sys-fs-fuse-connections.mount", "proc-sys-fs-binfmt_misc.automount", "systemd-binfmt.service",
                "kmod-static-nodes.service", "systemd-modules-load.service", "modprobe@configfs.service",
                "modprobe@dm_mod.service", "modprobe@drm.service", "modprobe@efi_pstore.service",
                "modprobe@fuse.service", "modprobe@loop.service", "systemd-pstore.service",
                "systemd-random-seed.service", "systemd-update-utmp.service",
                "systemd-update-utmp-runlevel.service", "systemd-journal-flush.service",
                "systemd-user-sessions.service", "e2scrub_reap.service", "timers.target")
# udev's coldplug at boot only for what a lab guest needs of the devices there before udevd: PCI
# (modalias: virtio-pci's module, then virtio-net's and -console's as their devices appear, which
# udev sees live), the root disk (dev-nvme0n1.device) and net (lo, which networkd waits for udev to
# have seen). Every device was ~217 events here (63 virtual consoles, CPUs, memory blocks, ACPI,
# PnP, ...), each a udev worker's rules under TCG, and the root disk's waited behind them (11-24 s)
UDEV_TRIGGER = """[Service]
ExecStart=
ExecStart=-udevadm trigger --type=subsystems --action=add
ExecStart=-udevadm trigger --type=devices --action=add --subsystem-match=pci --subsystem-match=block \\
 --subsystem-match=nvme --subsystem-match=net --subsystem-match=virtio --subsystem-match=virtio-ports
"""
DISK_SIZE = "1024M"  # the tree is ~280 MB; room for logs and leases
AGENT_PORT = "org.tabby.agent"  # the virtio-serial port's name (guest: /dev/virtio-ports/<name>)
AGENT_PATH = "/usr/local/sbin/tabby-guest-agent"
RECIPE = "6"  # bump when pristine() builds differently (hooks, excludes): a new name, a new build
CHECK_DIR = "/usr/local/lib/tabby"  # tabby.guest (render and check), for `python3 -m tabby.guest.check`


@dataclass(frozen=True)
class Image:
    """A bootable image: its disk (raw ext4, the root file system) and the kernel in it."""

    disk: Path
    kernel: Path


def packages(flavour: str) -> tuple[str, ...]:
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour: {flavour!r} is not one of {', '.join(FLAVOURS)}")
    return COMMON_PACKAGES + FLAVOUR_PACKAGES[flavour]


def pristine_key(flavour: str) -> str:
    """What names a pristine image: the package lists of every flavour (one build makes them all),
    the recipe's version and tabby's."""
    packages(flavour)
    every = ";".join(",".join(packages(f)) for f in FLAVOURS)
    h = hashlib.sha256(f"{SUITE}\0{every}\0{tabby.__version__}\0{RECIPE}\0{DISK_SIZE}".encode())
    return f"{flavour}-{h.hexdigest()[:16]}"


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {' '.join(argv)}\n{r.stderr[-3000:]}")
    return r


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _remove(tmp: Path) -> None:
    """A build directory gone, after unmounting anything still mounted under it (mmdebstrap mounts
    /proc, /sys and /dev/pts in its tree while it runs: a build that failed half-way may leave them,
    and rmtree must never walk into them)."""
    base = str(tmp.resolve()) + "/"
    with contextlib.suppress(OSError):
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(base)), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        if any(line.split()[1].startswith(base) for line in Path("/proc/self/mounts").read_text().splitlines()):
            return  # still mounted: left for a human rather than removed through a mount
    shutil.rmtree(tmp, ignore_errors=True)


def _prune(keep: str, pattern: str) -> None:
    """Older builds of the same kind (another tabby, recipe or guest code) removed: the cache holds
    one pristine image per flavour and one configured image per flavour and render."""
    for old in CACHE_ROOT.glob(pattern):
        if old.name != keep and old.is_dir() and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
            (CACHE_ROOT / f".{old.name}.lock").unlink(missing_ok=True)


def _image_in(d: Path) -> Image:
    return Image(d / "disk.raw", d / "vmlinuz")


def pristine(flavour: str) -> tuple[Image, float]:
    """The pristine image of flavour, built if this machine has none; (image, seconds spent building
    it and the other flavours: 0 when it was cached).

    One mmdebstrap run for all flavours (half the time of one per flavour: the download is most of
    it): the tree has every flavour's packages; from a copy of it, netplan.io is purged: that is the
    ifupdown image; from the tree itself, ifupdown and ISC dhclient are purged and systemd-networkd
    enabled (as cloud images ship it, with no .network file to act on): the networkd image."""
    packages(flavour)
    keys = {f: pristine_key(f) for f in FLAVOURS}
    with _locked(CACHE_ROOT / f".{keys[FLAVOURS[0]]}.lock"):
        if all((CACHE_ROOT / k / "done").exists() for k in keys.values()):
            return _image_in(CACHE_ROOT / keys[flavour]), 0.0
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=".build.", dir=CACHE_ROOT))
        try:
            tree = tmp / "tree"
            every = sorted({p for f in FLAVOURS for p in packages(f)})
            # no root password, no getty needed: the lab talks to the guest agent; a serial getty stays
            # (the tree as installed has every flavour's packages; each flavour's copy loses the others')
            _run(["mmdebstrap", "--variant=minbase", "--mode=root", f"--include={','.join(every)}",
                  *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
                  *(f"--dpkgopt=path-include={p}" for p in DPKG_INCLUDES),
                  # no initrd is booted (see MODULES_KEPT), so none is made: update-initramfs diverted
                  # before the kernel's package runs it
                  "--essential-hook=chroot \"$1\" dpkg-divert --quiet --local --rename --add "
                  "/usr/sbin/update-initramfs && ln -s /bin/true \"$1\"/usr/sbin/update-initramfs",
                  # mmdebstrap writes the build host's resolv.conf and hostname; a guest has its own
                  '--customize-hook=rm -f "$1"/etc/resolv.conf; echo guest > "$1"/etc/hostname',
                  # an empty machine-id: systemd makes one at first boot, so each VM's is its own (and
                  # so is networkd's DUID, which is derived from it), kept across reboots in the overlay
                  '--customize-hook=: > "$1"/etc/machine-id; rm -f "$1"/var/lib/dbus/machine-id',
                  SUITE, str(tree)], timeout=900)
            for unit in MASKED_UNITS:
                mask = tree / "etc/systemd/system" / unit
                mask.unlink(missing_ok=True)
                mask.symlink_to("/dev/null")
            dropin = tree / "etc/systemd/system/systemd-udev-trigger.service.d"
            dropin.mkdir(parents=True, exist_ok=True)
            (dropin / "tabby-lab.conf").write_text(UDEV_TRIGGER)
            for n, fl in enumerate(FLAVOURS):
                out = tmp / keys[fl]
                out.mkdir()
                if n < len(FLAVOURS) - 1:  # a copy for each flavour but the last, which takes the tree
                    _run(["cp", "-a", "--reflink=auto", str(tree), str(tmp / "flavour")])
                    ftree = tmp / "flavour"
                else:
                    ftree = tree
                others = [p for f in FLAVOURS if f != fl for p in FLAVOUR_PACKAGES[f] if p not in packages(fl)]
                _run(["chroot", str(ftree), "dpkg", "--purge", *others])
                if fl == "networkd":
                    shutil.rmtree(ftree / "etc/network", ignore_errors=True)
                    _run(["chroot", str(ftree), "systemctl", "enable", "systemd-networkd.service"])
                boot = ftree / "boot"
                shutil.copy(next(boot.glob("vmlinuz-*")), out / "vmlinuz")
                # inode tables and journal zeroed here, not by each guest's ext4lazyinit under TCG;
                # no metadata checksums: software crc32c on every metadata block (qemu64 has no SSE4.2)
                _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                      "-O", "^metadata_csum", "-d", str(ftree), str(out / "disk.raw"), DISK_SIZE])
                (out / "packages").write_text("\n".join(packages(fl)) + "\n")
                if ftree != tree:
                    shutil.rmtree(ftree)
            took = time.monotonic() - t0
            for fl, k in keys.items():
                _prune(k, f"{fl}-*")  # older pristine images, and the configured ones made from them
                (tmp / k / "done").write_text(f"{took:.1f}\n")
                shutil.rmtree(CACHE_ROOT / k, ignore_errors=True)
                (tmp / k).rename(CACHE_ROOT / k)
        finally:
            _remove(tmp)
        return _image_in(CACHE_ROOT / keys[flavour]), took


@contextlib.contextmanager
def mounted(disk: Path) -> Iterator[Path]:
    """disk (raw ext4) loop-mounted on a fresh directory; unmounted and removed after, even on failure."""
    mnt = Path(tempfile.mkdtemp(prefix="tabby-guest-mnt-"))
    try:
        _run(["mount", "-o", "loop", str(disk), str(mnt)])
        try:
            yield mnt
        finally:
            _run(["umount", str(mnt)])
    finally:
        mnt.rmdir()


# how a configured image is made from the pristine one: `tabby guest render --root` ("render"), the
# same with --cloud-init (networkd: netplan's network-config v2 in /etc/netplan), or nothing ("none":
# the pristine image as it is, to show the seed's problem)
RENDERS = ("render", "cloud-init", "none")


def render_args(flavour: str, ipv4: bool = True, rs_delay: int = 1, render: str = "render") -> list[str]:
    """The `tabby guest render` arguments of a configured image."""
    if render not in RENDERS:
        raise ValueError(f"render: {render!r} is not one of {', '.join(RENDERS)}")
    if render == "cloud-init" and flavour != "networkd":
        raise ValueError("render: cloud-init (network-config v2) is for the networkd flavour")
    distro = {"ifupdown": "debian", "networkd": "networkd"}[flavour]
    if render == "none":
        return []
    delay = ["--rs-delay", str(int(rs_delay))] if flavour != "networkd" else []  # networkd: its own RS
    return ["--distro", distro, "--ipv4" if ipv4 else "--no-ipv4", *delay,
            *(["--cloud-init"] if render == "cloud-init" else [])]


def configured(flavour: str, ipv4: bool = True, rs_delay: int = 1, render: str = "render") -> Image:
    """The pristine image with ``tabby guest render --root`` applied (render "none": nothing applied,
    the seed's problem), plus the lab's guest agent. Cached beside the pristine image, by the
    render's arguments and the hash of tabby's guest code."""
    base, _ = pristine(flavour)
    args = render_args(flavour, ipv4, rs_delay, render)
    src = Path(__file__).parent
    h = hashlib.sha256("\0".join(args).encode())
    for f in (Path(__file__), src / "guest_agent.py", src.parent / "guest" / "render.py",
              src.parent / "guest" / "check.py", src.parent / "cli" / "guest.py"):
        h.update(f.read_bytes())
    key = f"{base.disk.parent.name}-{render}-{h.hexdigest()[:12]}"
    d = CACHE_ROOT / key
    with _locked(CACHE_ROOT / f".{key}.lock"):
        if (d / "done").exists():
            return Image(d / "disk.raw", base.kernel)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=CACHE_ROOT))
        try:
            _run(["cp", "--sparse=always", str(base.disk), str(tmp / "disk.raw")])
            with mounted(tmp / "disk.raw") as root:
                if args:
                    _run([sys.executable, "-m", "tabby.cli", "guest", "render", *args, "--root", str(root)],
                         env={**os.environ, "PYTHONPATH": str(src.parent.parent)})
                install_agent(root)
            (tmp / "render").write_text(" ".join(args) + "\n")
            _prune(key, f"{base.disk.parent.name}-{render}-*")
            (tmp / "done").write_text("")
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Image(d / "disk.raw", base.kernel)


AGENT_UNIT = f"""[Unit]
Description=tabby lab guest agent (commands from the host over virtio-serial)

[Service]
Environment=PYTHONPATH={CHECK_DIR}
ExecStart=/usr/bin/python3 {AGENT_PATH} /dev/virtio-ports/{AGENT_PORT}
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


def install_agent(root: Path) -> None:
    """The guest agent and its unit, and tabby's guest package (render, check) for `guest check`."""
    src = Path(__file__).parent
    agent = root / AGENT_PATH.lstrip("/")
    agent.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "guest_agent.py", agent)
    agent.chmod(0o755)
    pkg = root / CHECK_DIR.lstrip("/") / "tabby"
    (pkg / "guest").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f'__version__ = "{tabby.__version__}"\n')
    for f in ("__init__.py", "render.py", "check.py"):
        shutil.copy(src.parent / "guest" / f, pkg / "guest" / f)
    # compiled here by the guest's own python3, not at each VM's first `guest check` under TCG
    _run(["chroot", str(root), "python3", "-m", "compileall", "-q", CHECK_DIR])
    unit = root / "etc/systemd/system/tabby-guest-agent.service"
    unit.write_text(AGENT_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "tabby-guest-agent.service"
    if not link.is_symlink():
        link.symlink_to("/etc/systemd/system/tabby-guest-agent.service")


def overlay(image: Image, path: Path) -> Path:
    """A qcow2 overlay on the configured image at path: the VM's own disk (the seed's snapshot)."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "raw", str(path)])
    return path


if __name__ == "__main__":  # python -m tabby.lab.guest_image FLAVOUR...: build (or find) the pristine images
    for fl in sys.argv[1:] or list(FLAVOURS):
        img, took = pristine(fl)
        print(f"{fl}: {img.disk} ({f'built in {took:.0f} s' if took else 'cached'})")
