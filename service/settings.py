"""Service settings, read from the environment (prefix ``KDCACHE_``).

``get_settings`` is the cached FastAPI dependency; tests override it, or pass their own
:class:`Settings` to :func:`kdcache.service.create_app`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kdcache.core.storage import is_remote

__all__ = ["RouteClass", "Settings", "get_settings"]

RouteClass = Literal["admin", "worker", "read"]
MIN_TOKEN_CHARS = 8


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="KDCACHE_", extra="ignore", frozen=True)

    root: str = Field(description="storage root: a directory or s3://bucket/prefix")
    db_url: str = Field(
        "", description="SQLAlchemy URL; default sqlite:///<ROOT>/kdcache.db for a local root"
    )
    admin_token: SecretStr | None = Field(None, description="submit and cancel jobs")
    worker_token: SecretStr | None = Field(None, description="lease, heartbeat, complete, fail")
    read_token: SecretStr | None = Field(None, description="reads; unset = open reads")
    lease_seconds: float = Field(120.0, gt=0, le=86400, description="lease length")
    max_attempts: int = Field(3, ge=1, le=1000, description="tries of a shard before its job fails")
    max_expiries: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="lease expiries (dead workers) of one shard before its job fails; "
        "default 10 x max_attempts",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest accepted request body")
    teacher_modules: str = Field(
        "",
        description="comma-separated modules (or packages) whose 'module:' teachers jobs "
        "submitted over REST may name; empty (the default): none, only 'hf' teachers",
    )

    def allowed_teacher_module(self, module: str) -> bool:
        """Whether ``pkg.mod`` of a ``pkg.mod:callable`` teacher is on the allowlist."""
        allowed = [m.strip() for m in self.teacher_modules.split(",") if m.strip()]
        return any(module == a or module.startswith(a + ".") for a in allowed)

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("KDCACHE_ROOT must name a directory or an s3:// URL")
        return v.rstrip("/") if is_remote(v) else str(Path(v.removeprefix("file://")).absolute())

    @field_validator("admin_token", "worker_token", "read_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, v: object) -> object:
        """A blank token (spaces) is unset, not a token anyone can guess; a set token is at
        least :data:`MIN_TOKEN_CHARS` characters without surrounding space."""
        if isinstance(v, SecretStr):
            v = v.get_secret_value()
        if isinstance(v, str):
            v = v.strip()
            if not v:
                return None
            if len(v) < MIN_TOKEN_CHARS:
                raise ValueError(f"a token must have at least {MIN_TOKEN_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _default_db(self) -> Settings:
        if not self.db_url:
            if is_remote(self.root):
                raise ValueError("KDCACHE_DB_URL is required when KDCACHE_ROOT is a remote URL")
            object.__setattr__(self, "db_url", f"sqlite:///{Path(self.root) / 'kdcache.db'}")
        return self

    def token(self, route_class: RouteClass) -> str | None:
        """The token a route class asks for, or None when that class is open."""
        secret = {
            "admin": self.admin_token,
            "worker": self.worker_token,
            "read": self.read_token,
        }[route_class]
        return secret.get_secret_value() if secret is not None else None

    def open_routes(self) -> list[RouteClass]:
        """Route classes anyone may call (no token configured); the CLI warns about these.

        ``admin`` or ``worker`` in this list means the service must only bind to loopback.
        """
        classes: tuple[RouteClass, ...] = ("admin", "worker", "read")
        return [c for c in classes if self.token(c) is None]


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()  # type: ignore[call-arg]  # root comes from KDCACHE_ROOT
