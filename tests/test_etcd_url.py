"""etcd store URLs: members, TLS files, user and password file, from the URL, the environment, CLI
flags and the CNI network configuration; every mistake refused naming the URL. No etcd needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tabby.cni.config import ConfError, parse
from tabby.store import open_store, with_etcd_options
from tabby.store.etcd import EtcdStore


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name in ("ca", "cert", "key", "pw"):
        (tmp_path / name).write_text("secret\n" if name == "pw" else "x")
        out[name] = str(tmp_path / name)
    return out


def members(store: object) -> list[str]:
    assert isinstance(store, EtcdStore)
    return [m.url for m in store._members]


def test_several_members_any_form() -> None:
    s = open_store("etcd://10.0.0.1:2379,[fd00::2]:2380,etcd3", environ={})
    assert members(s) == ["http://10.0.0.1:2379", "http://[fd00::2]:2380", "http://etcd3:2379"]
    assert repr(s) == "EtcdStore(etcd://10.0.0.1:2379,[fd00::2]:2380,etcd3:2379)"


def test_tls_and_user_from_url_or_environment(files: dict[str, str]) -> None:
    url = f"etcds://a:1,b:2?ca={files['ca']}&cert={files['cert']}&key={files['key']}"
    s = open_store(f"{url}&user=agent&password_file={files['pw']}", environ={})
    assert members(s) == ["https://a:1", "https://b:2"]
    assert isinstance(s, EtcdStore) and (s._user, s._password) == ("agent", "secret")  # one line, newline cut
    assert s._members[0].client.session.verify == files["ca"]
    assert s._members[0].client.session.cert == (files["cert"], files["key"])
    env = {"TABBY_ETCD_CA": files["ca"], "TABBY_ETCD_CERT": files["cert"], "TABBY_ETCD_KEY": files["key"],
           "TABBY_ETCD_USER": "agent", "TABBY_ETCD_PASSWORD_FILE": files["pw"]}
    s = open_store("etcds://a:1", environ=env)
    assert isinstance(s, EtcdStore) and s._user == "agent" and s._members[0].client.session.verify == files["ca"]
    s = open_store("etcd://a:1", environ=env)  # plain: TLS variables do not apply, the user does
    assert isinstance(s, EtcdStore) and s._user == "agent" and members(s) == ["http://a:1"]


@pytest.mark.parametrize("url, says", [
    ("etcd://", "needs host:port"),
    ("etcd://a:1,,b:2", "is not host:port"),
    ("etcd://a:notaport", "is not host:port"),
    ("etcd://a:99999", "is not host:port"),
    ("etcd://user:pw@a:1", "password_file"),
    ("etcd://a:1?ca=/x", "need etcds://"),
    ("etcds://a:1?cert=/x", "both cert and key"),
    ("etcds://a:1?ca=/no/such/file", "no such file"),
    ("etcds://a:1?colour=red", "query may name each of"),
    ("etcd://a:1?user=u", "needs a password_file"),
    ("etcd://a:1?user=u&user=v", "query may name each of"),
    ("http://a:1", "scheme must be sqlite:// or etcd://"),
    # loose before: a host of ":1" on 2379, an empty port, digits that are not ASCII, characters
    # that change the http:// URL the member goes into, and parts of the URL dropped unsaid
    ("etcd://:1", "is not host:port"),
    ("etcd://h:", "is not host:port"),
    ("etcd://127.0.0.1:\u0662\u0663\u0667\u0669", "is not host:port"),
    ("etcd://h:\u00b2", "is not host:port"),
    ("etcd://a b:1", "is not host:port"),
    ("etcd://h%40x:1", "is not host:port"),
    ("etcd://[x]:1", "is not host:port"),
    ("etcd://a:1/v3", "has no path"),
    ("etcd://a:1#frag", "has no path"),
    ("sqlite:///tmp/x.db?mode=ro", "a file path only"),
    ("sqlite:///tmp/x.db#frag", "a file path only"),
    ("sqlite:tabby.db", "must be absolute"),  # each process's working directory picked its own file
])
def test_mistakes_refused_naming_the_url(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as e:
        open_store(url, environ={})
    assert url in str(e.value)


def test_flags_and_cni_config_fold_into_the_url(files: dict[str, str]) -> None:
    url = with_etcd_options("etcds://a:1,b:2", ca=files["ca"], cert=files["cert"], key=files["key"], user=None)
    assert url == f"etcds://a:1,b:2?ca={files['ca']}&cert={files['cert']}&key={files['key']}"
    assert with_etcd_options(url, ca="/other").count("ca=/other") == 1  # a flag wins over the URL
    assert with_etcd_options("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ValueError, match="apply only to etcd"):
        with_etcd_options("sqlite:///x.db", ca=files["ca"])
    base = {"cniVersion": "1.1.0", "name": "n", "type": "tabby-cni"}
    conf = parse({**base, "store": "etcds://a:1", "etcd_ca": files["ca"], "etcd_user": "cni",
                  "etcd_password_file": files["pw"]})
    assert conf.store == f"etcds://a:1?ca={files['ca']}&user=cni&password_file={files['pw']}"
    with pytest.raises(ConfError, match="store: etcd_ca need the store URL"):
        parse({**base, "etcd_ca": files["ca"]})
    with pytest.raises(ConfError, match=r"store: .*apply only to etcd"):
        parse({**base, "store": "sqlite:///x.db", "etcd_ca": files["ca"]})


def test_an_empty_store_url_or_etcd_option_is_refused_not_taken_as_unset() -> None:
    """--store '' opened (and made) the default store; --etcd-user '' meant no user."""
    from tabby.store import store_url

    with pytest.raises(ValueError, match="empty"):
        store_url("")
    with pytest.raises(ValueError, match="user is empty"):
        with_etcd_options("etcd://a:1", user="")
