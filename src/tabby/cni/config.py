"""The CNI network configuration tabby accepts, validated with errors that name the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tabby.model.names import check_name
from tabby.model.resources import Metadata

SUPPORTED_VERSIONS = ("1.0.0", "1.1.0")


class NetConf(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    cni_version: str = Field(alias="cniVersion")
    name: str
    type: str
    store: str | None = None  # sqlite:///... or etcd://...; default $TABBY_STORE
    host: str | None = None  # the Host this node is; default $TABBY_HOST, else the hostname
    ipv6: bool = True
    ipv4: bool = True
    ipv6_pool: str | None = None
    ipv4_pool: str | None = None
    ipv6_gateway: Literal["link-local", "proxy-ndp"] = "link-local"
    profiles: list[str] = Field(default_factory=list)  # policy Profiles every container here gets
    labels: dict[str, str] = Field(default_factory=dict)  # labels for policy selectors


class ConfError(ValueError):
    pass


def parse(raw: bytes) -> NetConf:
    try:
        conf = NetConf.model_validate_json(raw)
    except ValidationError as e:
        msgs = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfError("; ".join(msgs)) from None
    if conf.cni_version not in SUPPORTED_VERSIONS:
        raise ConfError(f"cniVersion: {conf.cni_version} not supported ({', '.join(SUPPORTED_VERSIONS)})")
    try:
        check_name(conf.name)
    except ValueError as e:
        raise ConfError(f"name: {e}") from None
    for i, profile in enumerate(conf.profiles):
        try:
            check_name(profile)
        except ValueError as e:
            raise ConfError(f"profiles.{i}: {e}") from None
    try:
        Metadata(name="x", labels=conf.labels)
    except ValidationError as e:
        raise ConfError("; ".join(f"labels: {err['msg']}" for err in e.errors())) from None
    if not conf.ipv6 and not conf.ipv4:
        raise ConfError("ipv6/ipv4: at least one family must be on")
    return conf
