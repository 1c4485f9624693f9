"""Where a Model's weights come from: `spec.source` (node store, PVC, node folder, or the
Hugging Face Hub with `spec.source.hub`)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from moeflow.domain.spec_base import QUANTITY_PATTERN, SpecModel

SOURCE_SCHEMES = ("store", "pvc", "file", "hf")
# hf://org/name[@revision]: a repo id as huggingface_hub takes it (the CRD's pattern agrees)
_HUB_URI = re.compile(r"^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[^@\s]+)?$")
HUB_ENV = frozenset({"HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME", "HF_HUB_CACHE"})
"""Variables the operator sets on engines of an hf:// Model (from `spec.source.hub`)."""
TOKEN_ENV = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
"""Never a literal `value` in `spec.env`: a token comes from a Secret."""


class SecretKeyRef(SpecModel):
    """One key of a Secret in the Model's namespace (read by the kubelet, never by us)."""

    name: str = Field(min_length=1)
    key: str = Field("HF_TOKEN", min_length=1)


class HubCache(SpecModel):
    """Where engines keep the Hub download (HF_HOME): a PersistentVolumeClaim by name, shared
    by the Model's engines and kept across restarts, or else an emptyDir per Pod."""

    claim_name: str | None = Field(None, min_length=1)
    size_limit: str | None = Field(None, pattern=QUANTITY_PATTERN)
    """emptyDir only: its sizeLimit."""

    @model_validator(mode="after")
    def _check_one_kind(self) -> HubCache:
        if self.claim_name and self.size_limit:
            raise ValueError("sizeLimit applies to the emptyDir cache only; fix: drop sizeLimit"
                             " (the claim's own size bounds it) or claimName")
        return self


class HubSource(SpecModel):
    """How engines reach the Hub for an `hf://` source (huggingface_hub's variables)."""

    endpoint: str | None = Field(None, pattern=r"^https?://.+")
    """HF_ENDPOINT (a mirror or a private hub); unset: huggingface.co."""
    offline: bool = False
    """HF_HUB_OFFLINE=1: only the cache, which must then be a claim that holds the model."""
    token_secret_ref: SecretKeyRef | None = None
    """HF_TOKEN from this Secret key (gated or private repos)."""
    cache: HubCache = HubCache()

    @model_validator(mode="after")
    def _check_offline(self) -> HubSource:
        if self.offline and not self.cache.claim_name:
            raise ValueError("offline needs cache.claimName: an offline engine reads only its"
                             " cache, and an emptyDir starts empty; fix: set cache.claimName to a"
                             " PVC holding the model, or drop offline")
        return self


class Source(SpecModel):
    """Where the weights are. `store://<name>`: the node model store (host path);
    `pvc://<claim>[/<sub/path>]`: a PersistentVolumeClaim; `file:///<dir>`: a node directory;
    `hf://org/name[@revision]`: the Hugging Face Hub, fetched by each engine through
    huggingface_hub (KServe's `storageUri: hf://` habit), configured by `hub`."""

    uri: str
    architecture: str | None = None
    hub: HubSource | None = None

    @field_validator("uri")
    @classmethod
    def _check_scheme(cls, uri: str) -> str:
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme not in SOURCE_SCHEMES or not rest:
            raise ValueError(
                f"{uri!r} is not a supported source; fix: use store://<name>,"
                " pvc://<claim>[/<path>], file:///<dir> or hf://<org>/<name>[@<revision>]"
            )
        if scheme == "hf" and (not _HUB_URI.match(uri) or ".." in uri):
            raise ValueError(f"{uri!r} is not a Hub model; fix: write hf://<org>/<name> or"
                             " hf://<org>/<name>@<revision>")
        return uri

    @model_validator(mode="after")
    def _check_hub(self) -> Source:
        if self.hub is not None and self.scheme != "hf":
            raise ValueError(f"hub applies to hf:// sources only, not {self.uri!r}; fix:"
                             " drop spec.source.hub or use an hf:// uri")
        return self

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    @property
    def location(self) -> str:
        return self.uri.split("://", 1)[1]

    @property
    def hub_settings(self) -> HubSource:
        """`hub`, or its defaults (an hf:// source without `hub`)."""
        return self.hub or HubSource()
