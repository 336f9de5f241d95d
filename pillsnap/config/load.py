"""Reading the configuration: base file, profile and `key=value` overrides merged onto the schema, checked, returned
typed; and its dict / YAML / hash forms."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pillsnap.config.checks import check_values
from pillsnap.config.schema import ConfigError, PillSnapConfig
from pillsnap.core import layout

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "pillsnap.yaml"
PROFILE_DIR = REPO_ROOT / "configs" / "profiles"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: bad config key '{key}': {msg}") from None


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml parser errors have many types
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def _stage_keys_as_int(node: Any, parent: str = "") -> Any:
    """A dotlist spells `data.stages.1.classes` with the key "1"; the stage tables are keyed by int."""
    if not isinstance(node, dict):
        return node
    return {(int(k) if parent == "stages" and str(k).isdigit() else k): _stage_keys_as_int(v, str(k))
            for k, v in node.items()}


def profile_path(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in {".yaml", ".yml"}:
        return path
    candidate = PROFILE_DIR / f"{profile}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile '{profile}' (known: {', '.join(known)})")
    return candidate


def load_config(
    config_path: Optional[str | Path] = None,
    profile: Optional[str] = None,
    overrides: Sequence[str] = (),
) -> PillSnapConfig:
    """Base file, then the profile, then `key=value` overrides; validated; returned as a typed object."""
    base_path = Path(config_path) if config_path else DEFAULT_CONFIG
    cfg = OmegaConf.structured(PillSnapConfig)
    cfg = _merge(cfg, _read_yaml(base_path), str(base_path))
    source = str(base_path)
    if profile:
        path = profile_path(profile)
        cfg = _merge(cfg, _read_yaml(path), str(path))
        source = f"{base_path} + {path}"
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        try:
            dotlist = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as e:
            raise ConfigError(f"command-line override: {e}") from None
        cfg = _merge(cfg, _stage_keys_as_int(dotlist), "command-line override")
        source += " + command line"
    check_values(cfg, source)
    return OmegaConf.to_object(cfg)


def to_dict(cfg: PillSnapConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(data: Dict[str, Any]) -> PillSnapConfig:
    """to_dict's form back, also after a JSON round trip (which turns the stage tables' int keys into strings)."""
    cfg = _merge(OmegaConf.structured(PillSnapConfig), _stage_keys_as_int(data), "config dict")
    check_values(cfg, "config dict")
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: PillSnapConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: PillSnapConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def save_resolved(cfg: PillSnapConfig, run: str, exp_dir: Optional[Path] = None) -> Path:
    """The run's resolved config, kept as config.resolved.<run>.yaml (every run's stays) and as the newest
    config.resolved.yaml; returns the run's file."""
    text = to_yaml(cfg)
    for out in (layout.resolved_config(exp_dir or cfg.exp_dir, run), layout.resolved_config(exp_dir or cfg.exp_dir)):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
    return layout.resolved_config(exp_dir or cfg.exp_dir, run)


def pick(config: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a config dict (to_dict's form); KeyError names a key the schema lacks."""
    node: Any = config
    for part in dotted.split("."):
        node = node[int(part) if isinstance(node, dict) and part.isdigit() and int(part) in node else part]
    return node


def config_fingerprint(config: Mapping[str, Any], keys: Sequence[str], *extra: Any) -> str:
    """A short hash of the listed config keys (and `extra` values): what a cache key or a fingerprint depends on,
    listed beside the code it keys."""
    text = json.dumps({"config": {k: pick(config, k) for k in keys}, "extra": list(extra)}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
