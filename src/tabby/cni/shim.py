"""``tabby-cni``: hand the call to this host's warm ``tabby cni-server``, or run it here.

Why a shim: a runtime starts one plugin process per call, and a Python process's start-up is
most of a warm call. This file imports nothing but built-in modules (``posix``, ``_socket``, ``_json``:
not even ``os``, ``socket`` and ``json``, whose Python layers cost ~15 ms of start-up between
them; no ``from __future__`` either); the server has everything loaded already. Run in-process,
the call imports no pydantic and no yaml either (``tabby.model.light``), and ``site`` only if an
import needs it (``_SiteOnDemand``). The call goes in-process instead when no server answers
on the socket, or when the server sits in another network namespace than the caller (it would
make the veth in its own), or does not see the caller's CNI_NETNS path as the same namespace
file. Once the server has the request, its answer is final: a server that dies mid-call yields
CNI error 11 (try again later), never a second attempt here, so an ADD is never run twice at once.

Wire format (one request per connection, both ways ended by EOF): request ``TBY1``, a 4-byte
big-endian length, that many bytes of NUL-separated fields (this process's network namespace
inode, what CNI_NETNS names here as "dev:ino" or "", then ``KEY=VALUE`` for each CNI_* and
TABBY_STORE / TABBY_HOST variable), then stdin as it came. Reply ``TBY1`` then either ``F``
(run it yourself) or the exit code, a newline, and the plugin's stdout.
"""

import _socket
import posix  # what os wraps: with -S nothing has imported os yet, and it costs ~1-3 ms
import sys

SOCKET_DIR = "/run/tabby/cni"
TRY_AGAIN = 11
MAGIC = b"TBY1"
# What VERSION answers (config.py checks cniVersion against the same list).
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
FORWARDED = ("TABBY_STORE", "TABBY_HOST")


class _Ctx:  # what _json's scanner reads from a decoder
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float


def _loads(text: str) -> object:
    import _json

    start = len(text) - len(text.lstrip())
    obj, end = _json.make_scanner(_Ctx)(text, start)
    if text[end:].strip():
        raise ValueError("trailing data")
    return obj


def plain_socket_path(path: str) -> bool:
    """A path a unix socket can have, written plainly: absolute, no "." or ".." step, not ending
    in "/", no control character, and short enough for sun_path (108 bytes with its NUL)."""
    steps = path.split("/")
    return path.startswith("/") and len(path.encode("utf-8", "surrogatepass")) <= 107 and steps[-1] != "" and \
        all(s not in (".", "..") for s in steps) and all(c.isprintable() for c in path)


def socket_path(raw: bytes, environ: dict[str, str]) -> str | None:
    """The server socket for this call: the config's ``server_socket``, else one per host name."""
    try:
        conf = _loads(raw.decode("utf-8"))
    except Exception:  # StopIteration, ValueError, UnicodeError: let the full parser report it
        return None
    if not isinstance(conf, dict):
        return None
    sock = conf.get("server_socket")
    if isinstance(sock, str) and sock:  # not plain: in-process, where the parser says why
        return sock if plain_socket_path(sock) else None
    host = conf.get("host") or environ.get("TABBY_HOST") or posix.uname().nodename
    if not isinstance(host, str) or not 0 < len(host) <= 253 or not host.isascii() or \
            not all(c.isalnum() or c in "._-" for c in host) or not host[0].isalnum():
        return None
    return f"{SOCKET_DIR}/{host}.sock"


def netns_id() -> int:
    return posix.stat("/proc/self/ns/net").st_ino


def path_id(path: str) -> str:
    """What a path names, as this process sees it ("" if nothing): CNI_NETNS is a path, and a
    runtime like podman mounts its namespaces where only its own mount namespace sees them."""
    try:
        st = posix.stat(path)
    except (OSError, ValueError):
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def encode_request(environ: dict[str, str], raw: bytes) -> bytes:
    env = [f"{k}={v}" for k, v in environ.items() if k.startswith("CNI_") or k in FORWARDED]
    netns = environ.get("CNI_NETNS", "")
    head = "\0".join([str(netns_id()), path_id(netns) if netns else "", *env]).encode("utf-8", "surrogateescape")
    return MAGIC + len(head).to_bytes(4, "big") + head + raw


def via_server(path: str, environ: dict[str, str], raw: bytes) -> tuple[int, str] | None:
    """(code, stdout) from the server; None when there is no server for us to use."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(path)
    except OSError:
        s.close()
        return None
    chunks = []
    try:
        s.settimeout(300.0)
        s.sendall(encode_request(environ, raw))
        s.shutdown(_socket.SHUT_WR)
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except OSError as e:
        return _try_again(f"tabby cni-server: {e}")
    finally:
        s.close()
    reply = b"".join(chunks)
    if reply == MAGIC + b"F":
        return None
    code, sep, out = reply[4:].partition(b"\n")
    if not reply.startswith(MAGIC) or not sep or not code.isdigit():
        return _try_again("tabby cni-server ended without an answer")
    return int(code), out.decode("utf-8", "replace")


class _SiteOnDemand:
    """Last on ``sys.meta_path`` of a shim started lean (``-S``, install.py) that runs a call
    itself: the normal ADD and DEL need nothing from site-packages, so ``site`` (~5 ms: every
    .pth file) is loaded only when an import finds nothing without it (pydantic for a record off
    the fast path, the etcd client), and that import is tried again."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> object:
        sys.meta_path.remove(_SiteOnDemand)  # type: ignore[arg-type]
        import site
        from importlib.machinery import PathFinder

        site.main()
        return PathFinder.find_spec(name, path)  # type: ignore[arg-type]


def _try_again(why: str) -> tuple[int, str]:
    why = why.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
    return 1, f'{{"cniVersion": "1.1.0", "code": {TRY_AGAIN}, "msg": "try again later", "details": "{why}"}}'


def main() -> None:
    environ = {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
               for k, v in posix.environ.items()}
    command = environ.get("CNI_COMMAND")
    if command == "VERSION":
        versions = ", ".join(f'"{v}"' for v in SUPPORTED_VERSIONS)
        result: tuple[int, str] | None = (0, f'{{"cniVersion": "{SUPPORTED_VERSIONS[-1]}", '
                                             f'"supportedVersions": [{versions}]}}')
        raw = b""
    else:
        raw = sys.stdin.buffer.read()
        path = socket_path(raw, environ) if not environ.get("TABBY_CNI_NO_SERVER") else None
        result = via_server(path, environ, raw) if path else None
    here = result is None
    if here:
        if sys.flags.no_site and "site" not in sys.modules:
            sys.meta_path.append(_SiteOnDemand)  # type: ignore[arg-type]
        from tabby.cni.main import run

        result = run(environ, raw)
    code, out = result
    if out:
        sys.stdout.write(out + "\n")
    sys.stdout.flush()
    if here:
        sys.exit(code)  # the call ran here: let the interpreter close the Store and flush logs
    # the server did the call and this process holds nothing but its answer, now written: end
    # without the interpreter's finalization, ~2 ms of a ~20 ms call (median of 150 starts here)
    sys.stderr.flush()
    posix._exit(code)


if __name__ == "__main__":
    main()
