"""Every CNI input checked before use: the CNI_* variables, the arguments, stdin.

A bad value is a ``CniError`` with code 4 (environment) or 7 (config) whose message names the
variable or field. Nothing here touches the kernel or the Store; the namespace file itself is
opened and type-checked by ``nl.open_netns`` when a verb needs it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tabby.cni.errors import INVALID_ENV, CniError
from tabby.model.names import check_interface_name
from tabby.model.plain import Frozen

# The spec's rule for a container id (libcni's ValidateContainerID): alphanumeric first, then
# alphanumerics, '_', '.', '-'. ASCII only: [0-9A-Za-z], not \w, which matches every script.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_CONTAINER_ID = 255  # the spec names none; ids seen are 64 hex characters
MAX_NETNS_PATH = 4096
MAX_CNI_ARGS = 4096
_ARG_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_ARG_VALUE = re.compile(r"[!-~]{0,1024}")  # printable ASCII, no spaces
MAX_STDIN_BYTES = 256 * 1024  # a conflist entry with a prevResult of many interfaces is a few KiB
VERBS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")


class Env(Frozen):
    """An attachment verb's checked environment."""

    __slots__ = ("args", "command", "container_id", "ifname", "netns", "parsed_args")
    command: str
    container_id: str
    netns: str
    ifname: str
    args: str
    parsed_args: dict[str, str]

    def __init__(self, command: str, container_id: str, netns: str, ifname: str, args: str = "",
                 parsed_args: dict[str, str] | None = None) -> None:
        self._set(command=command, container_id=container_id, netns=netns, ifname=ifname, args=args,
                  parsed_args={} if parsed_args is None else parsed_args)

    def values(self) -> tuple[str, ...]:  # what makes two equal: the parsed arguments follow from args
        return self.command, self.container_id, self.netns, self.ifname, self.args


def command(environ: Mapping[str, str]) -> str:
    verb = environ.get("CNI_COMMAND", "")
    if verb not in VERBS:
        shown = verb if verb.isascii() and verb.isprintable() and len(verb) <= 16 else "(not printable)"
        raise CniError(INVALID_ENV, f"CNI_COMMAND: unknown verb {shown or '(unset)'}")
    return verb


def check_container_id(value: str) -> str:
    if not value:
        raise CniError(INVALID_ENV, "CNI_CONTAINERID: missing")
    if len(value) > MAX_CONTAINER_ID or not _CONTAINER_ID.fullmatch(value):
        raise CniError(INVALID_ENV, "CNI_CONTAINERID: invalid container id",
                       f"must start with a letter or digit, then letters, digits, '_', '.' or '-', "
                       f"at most {MAX_CONTAINER_ID} characters")
    return value


def check_ifname(value: str) -> str:
    if not value:
        raise CniError(INVALID_ENV, "CNI_IFNAME: missing")
    try:
        check_interface_name(value)
        # stricter than the kernel: "-x" reads as an option to any tool, and the name ends the
        # attachment's Endpoint name, which must end in a letter or digit ("eth0-" was refused only
        # there, after the veth was made, as a "try again" that never passed)
        if not (value[0].isalnum() and value[-1].isalnum()):
            raise ValueError(value)
    except ValueError:
        raise CniError(INVALID_ENV, "CNI_IFNAME: invalid interface name",
                       "1..15 characters of letters, digits, '_', '.' or '-', starting and ending with a letter "
                       "or digit (no '/', ':', whitespace, control characters)") from None
    return value


def check_netns_path(value: str) -> str:
    if not value.startswith("/") or len(value) > MAX_NETNS_PATH or not value.isprintable():
        raise CniError(INVALID_ENV, "CNI_NETNS: must be an absolute path to a network namespace file")
    return value


def parse_args(value: str) -> dict[str, str]:
    """CNI_ARGS "K=V;K2=V2" -> dict; unknown keys are kept (the runtime may pass any), bad syntax is refused."""
    if not value:
        return {}
    if len(value) > MAX_CNI_ARGS:
        raise CniError(INVALID_ENV, f"CNI_ARGS: longer than {MAX_CNI_ARGS} characters")
    out: dict[str, str] = {}
    for i, pair in enumerate(value.split(";")):
        if not pair:
            continue  # a trailing ';'
        key, sep, val = pair.partition("=")
        if not sep or not _ARG_KEY.fullmatch(key) or not _ARG_VALUE.fullmatch(val):
            raise CniError(INVALID_ENV, f"CNI_ARGS: pair {i + 1} is not KEY=VALUE",
                           "keys of letters, digits, '_', '.', '-'; values of printable ASCII without spaces")
        if key in out:
            raise CniError(INVALID_ENV, f"CNI_ARGS: {key} given twice")
        out[key] = val
    return out


def env_for(verb: str, environ: Mapping[str, str]) -> Env:
    """The checked environment of an attachment verb (ADD, DEL, CHECK)."""
    cid = check_container_id(environ.get("CNI_CONTAINERID", ""))
    ifname = check_ifname(environ.get("CNI_IFNAME", ""))
    netns = environ.get("CNI_NETNS", "")
    if netns or verb != "DEL":  # DEL may come after the namespace is gone
        if not netns:
            raise CniError(INVALID_ENV, "CNI_NETNS: missing")
        check_netns_path(netns)
    raw_args = environ.get("CNI_ARGS", "")
    return Env(verb, cid, netns, ifname, raw_args, parse_args(raw_args))
