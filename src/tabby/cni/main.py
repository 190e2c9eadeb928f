"""The CNI verbs behind one function: environment and stdin in, (exit code, CNI JSON) out.

``run`` is what both callers use: the in-process fallback of ``tabby-cni`` (``shim.py``) and the
warm ``tabby cni-server`` (``server.py``). Nothing here reads ``os.environ``: the caller passes
the CNI_* variables (and TABBY_STORE / TABBY_HOST) it was given, so one server serves many calls.
Order: the verb, then stdin (decoded and checked), then the variables the verb needs; nothing
is touched before all of them are valid.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping

from tabby.cni import inputs
from tabby.cni.config import SUPPORTED_VERSIONS, ConfError, load, parse
from tabby.cni.errors import INCOMPATIBLE, INTERNAL, INVALID_CONF, INVALID_ENV, IO_FAILURE, TRY_AGAIN, CniError
from tabby.cni.plugin import Context, Phases, add, check, delete, gc, host_name, status, version
from tabby.cni.result import at_least
from tabby.model.names import check_name

log = logging.getLogger(__name__)


def run(environ: Mapping[str, str], raw: bytes, ctx: Context | None = None,
        phases: Phases | None = None) -> tuple[int, str]:
    ver = SUPPORTED_VERSIONS[-1]
    try:
        command = inputs.command(environ)
        if command == "VERSION":
            return 0, json.dumps(version())
        try:
            doc = load(raw)
            if isinstance(doc.get("cniVersion"), str) and doc["cniVersion"] in SUPPORTED_VERSIONS:
                ver = doc["cniVersion"]
            conf = parse(doc)
        except ConfError as e:
            raise CniError(INVALID_CONF, "invalid network configuration", str(e)) from None
        conf.store = conf.store or environ.get("TABBY_STORE") or None
        if not conf.host and environ.get("TABBY_HOST"):
            try:
                conf.host = check_name(environ["TABBY_HOST"])
            except ValueError:
                raise CniError(INVALID_ENV, "TABBY_HOST cannot name a tabby Host",
                               f"{environ['TABBY_HOST'][:80]!r}: letters, digits, '.', '_', '-'") from None
        conf.host = host_name(conf)  # checked here, before anything is touched
        if command in ("STATUS", "GC"):
            if not at_least(ver, "1.1.0"):
                raise CniError(INCOMPATIBLE, f"{command} needs cniVersion 1.1.0, not {ver}")
            if command == "STATUS":
                status(conf, ctx)
            else:
                gc(conf, doc, ctx)
            return 0, ""
        env = inputs.env_for(command, environ)
        if command == "ADD":
            return 0, json.dumps(add(conf, env, ctx, phases))
        if command == "DEL":
            delete(conf, env, ctx, phases)
        else:
            check(conf, env, ctx)
        return 0, ""
    except CniError as e:
        return 1, json.dumps(e.json(ver))
    except OSError as e:  # the kernel or a file said no: I/O failure, with what it said
        log.warning("CNI %s: %s", environ.get("CNI_COMMAND"), e)
        return 1, json.dumps(CniError(IO_FAILURE, "system call failed", str(e)).json(ver))
    except Exception as e:  # never a bare traceback: a CNI error on stdout, whatever it was
        store = sys.modules.get("tabby.store")  # (imported only by the verbs that use it: the lean path)
        if store is not None and isinstance(e, store.StoreError):  # a verb's own handling missed it
            log.warning("CNI %s: %s", environ.get("CNI_COMMAND"), e)
            return 1, json.dumps(CniError(TRY_AGAIN, "store unavailable", str(e)).json(ver))
        log.exception("CNI %s failed", environ.get("CNI_COMMAND"))
        return 1, json.dumps(CniError(INTERNAL, "internal error", f"{type(e).__name__}: {e}"[:2000]).json(ver))


def main() -> None:
    """In-process entry (no server): what the shim falls back to."""
    import os
    import sys

    code, out = run(os.environ, sys.stdin.buffer.read())
    if out:
        print(out)
    sys.exit(code)
