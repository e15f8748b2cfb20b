"""Tile configurations of the GEMM launchers: frozen dataclasses of meta-parameters, parsed from the environment
variables that pin them (``FP8_DEEP_GEMM_CONFIG``, ``FP8_DEEP_WGRAD_CONFIG``) and printed back the same way."""
from __future__ import annotations

from dataclasses import fields

__all__ = ["TileConfig"]


class TileConfig:
    """Mixin of a frozen dataclass: ``parse`` from a config, a dict or ``"KEY=VALUE,..."`` (unset keys default; fields
    whose default is a bool take 1/0/true/false/yes/no/on/off), and ``str()`` in that same form."""
    _WHAT = "config"  # how errors name it

    @classmethod
    def parse(cls, spec):
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            items = {}
            for part in filter(None, (p.strip() for p in spec.split(","))):
                if "=" not in part:
                    raise ValueError(f"config entry {part!r} is not KEY=VALUE (in {spec!r})")
                k, v = (s.strip() for s in part.split("=", 1))
                items[k] = v
            spec = items
        if not isinstance(spec, dict):
            raise TypeError(f"config must be a {cls.__name__}, dict or 'KEY=VALUE,...' string, got "
                            f"{type(spec).__name__}")
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for k, v in spec.items():
            if k not in known:
                raise ValueError(f"unknown {cls._WHAT} key {k!r}; known: {sorted(known)}")
            if isinstance(known[k].default, bool):
                kwargs[k] = str(v).lower() in ("1", "true", "yes", "on") if isinstance(v, str) else bool(v)
            else:
                kwargs[k] = int(v)
        return cls(**kwargs)

    def __str__(self) -> str:
        return ",".join(f"{f.name}={int(getattr(self, f.name))}" for f in fields(self))

    # shared __post_init__ checks; messages name the class and the field
    def _check_pow2(self, names, lo: int, hi: int) -> None:
        for name in names:
            v = getattr(self, name)
            if not (lo <= v <= hi and v & (v - 1) == 0):
                raise ValueError(f"{type(self).__name__}.{name} must be a power of two in [{lo}, {hi}], got {v}")

    def _check_warps(self, most: int = 16) -> None:
        allowed = tuple(2 ** i for i in range(most.bit_length()))
        if self.num_warps not in allowed:
            raise ValueError(f"{type(self).__name__}.num_warps must be one of {allowed}, got {self.num_warps}")
