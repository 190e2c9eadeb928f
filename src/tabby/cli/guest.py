"""`tabby guest render` and `check`: what a VM image needs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tabby.cli.common import (
    app,
    err,
    fail,
    out,
)

guest_app = typer.Typer(help="What a VM image needs for tabby: render it, or check a running guest.",
                        no_args_is_help=True)
app.add_typer(guest_app, name="guest")


@guest_app.command("render")
def guest_render(
    distro: Annotated[str, typer.Option(
        help="ubuntu | debian | centos (their own network scripts) | networkd (systemd-networkd)")],
    root: Annotated[Path | None, typer.Option(help="write into this mounted image root instead of printing")] = None,
    interface: Annotated[list[str] | None, typer.Option(help="guest interfaces (repeat); default eth0")] = None,
    ipv4: Annotated[bool, typer.Option(help="also DHCPv4 (dual-stack)")] = True,
    cloud_init: Annotated[bool, typer.Option("--cloud-init", help="cloud-init user-data instead (networkd: "
                                             "network-config v2, into /etc/netplan with --root)")] = False,
    rs_delay: Annotated[int, typer.Option(help="router_solicitation_delay in seconds (the seed: 10; it also "
                                          "delays the first DAD probe, so boot is slower)", min=0, max=60)] = 1,
    ipv6: Annotated[str, typer.Option(help="the subnet's IPv6 mode: dhcpv6-stateful | dhcpv6-stateless | slaac "
                                      "(SLAAC modes: EUI-64 only, privacy addresses off)")] = "dhcpv6-stateful",
) -> None:
    """DHCPv6 (or, on SLAAC subnets, the RA's EUI-64 address) on each interface with accept_ra 1,
    the dhclient /128 fix, the RS-delay sysctl."""
    from tabby.guest import render as R

    if distro == "networkd" and rs_delay != R.DEFAULT_RS_DELAY:
        fail("--rs-delay: systemd-networkd sends its own router solicitations; the sysctl does not apply to it")
    ifaces = tuple(interface or ["eth0"])
    try:
        from tabby.model.names import check_interface_name

        for i in ifaces:
            check_interface_name(i)
        files = R.render(distro, ifaces, ipv4, rs_delay, ipv6)
    except ValueError as e:
        fail(str(e))
    if root is not None and not root.is_dir():  # an image not mounted there would get the files
        fail(f"--root {root}: not a directory (mount the image's root filesystem there first)")
    try:
        _render_out(distro, files, ifaces, ipv4, rs_delay, ipv6, root, cloud_init)
    except OSError as e:  # an image that cannot take a file (read-only, a directory in its place)
        fail(f"--root {root}: cannot write {e.filename or ''}: {e.strerror or e}")


def _render_out(distro: str, files: Any, ifaces: tuple[str, ...], ipv4: bool, rs_delay: int, ipv6: str,
                root: Path | None, cloud_init: bool) -> None:
    from tabby.guest import render as R

    if cloud_init and distro == "networkd":  # cloud images with netplan: network-config v2
        text = R.network_config_v2(ifaces, ipv4, ipv6)
        if root is None:
            print(text, end="")
            return
        target = _in_image(root, "etc/netplan/50-tabby.yaml")  # where netplan reads it at boot (its generator)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o600)  # netplan warns about world-readable files
        out.print(f"wrote {target}", highlight=False)
        return
    if cloud_init:
        if root is not None:
            fail("--cloud-init with --root: only for --distro networkd (netplan's network-config v2)")
        print(R.cloud_init(distro, ifaces, ipv4, rs_delay, ipv6), end="")
        return
    for f in files:
        if root is None:
            print(f"# {f.path}" + (" (insert after the first line)" if f.mode != "replace" else ""))
            print(f.text)
            continue
        target = _in_image(root, f.path.lstrip("/"))
        if f.mode == "replace":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f.text)
        elif target.exists():
            target.write_text(R.patch_script(target.read_text()))
        else:
            err.print(f"[yellow]warning:[/] {f.path} not in the image: no ISC dhclient to fix")
            continue
        out.print(f"wrote {target}", highlight=False)


def _in_image(root: Path, rel: str) -> Path:
    """root/rel, refused if any step of it that exists leads outside root: an image's symlink
    (img/etc -> /etc, or an absolute one, meant for the guest's own root) would otherwise have the
    files written into this machine's /etc."""
    base = root.resolve()
    p = base
    for part in Path(rel).parts:
        p = p / part
        if p.is_symlink() or p.exists():
            real = p.resolve()
            if not real.is_relative_to(base):
                fail(f"--root: {root / rel} leads outside the image (to {real}): nothing written there")
    return base / rel


@guest_app.command("check")
def guest_check(interface: Annotated[list[str] | None, typer.Option(help="interfaces (repeat)")] = None,
                root: Annotated[Path, typer.Option(help="where the guest's files are (default /)")] = Path("/"),
                ) -> None:
    """Run inside a guest: each requirement met or not, with the fix. Exit 1 if any is not met."""
    from tabby.guest.check import check

    try:
        findings = check(tuple(interface or ["eth0"]), root)
    except ValueError as e:
        fail(f"--interface: {e}")
    for f in findings:
        mark = "[green]ok[/]  " if f.ok else "[red]FAIL[/]"
        out.print(f"{mark} {f.requirement}: {f.detail}" + ("" if f.ok else f"\n      fix: {f.fix}"), highlight=False)
    if not all(f.ok for f in findings):
        raise typer.Exit(1)
