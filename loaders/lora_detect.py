"""Which model family a LoRA (or a model) is for, from its module names alone.

Rules are regular expressions on the module name with its dialect prefix stripped and dots made
underscores, so kohya, official and diffusers spellings read the same. The family with the most
matching modules wins; a file matching no rule (a text-encoder-only LoRA) has no family.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from .families import FAMILIES
from .lora_keys import MODULE_PREFIXES, is_text_encoder_key, split_lora_key

# family -> module-name rules (the registry's ``lora_rules``)
FAMILY_RULES: dict[str, tuple[str, ...]] = {f.name: f.lora_rules for f in FAMILIES.values() if f.lora_rules}
_COMPILED = {family: re.compile("|".join(rules)) for family, rules in FAMILY_RULES.items()}
FAMILY_NAMES = {name: FAMILIES[name].display_name for name in FAMILY_RULES}


def _plain_module(module: str) -> str:
    for prefix, _ in MODULE_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    return module.replace(".", "_")


def family_of_modules(modules: Iterable[str]) -> str | None:
    """The family most of these module names belong to (prefixes and dots are ignored); None if none."""
    votes: Counter[str] = Counter()
    for module in modules:
        plain = _plain_module(module)
        for family, pattern in _COMPILED.items():
            if pattern.search(plain):
                votes[family] += 1
    return votes.most_common(1)[0][0] if votes else None


def lora_family(keys: Iterable[str]) -> str | None:
    """The family a LoRA file's diffusion keys are for; None for text-encoder-only or unknown files."""
    modules = []
    for key in keys:
        parts = split_lora_key(key)
        if parts is not None and not is_text_encoder_key(key):
            modules.append(parts[0])
    return family_of_modules(modules)


def keys_of_no_family(keys: Iterable[str]) -> list[str]:
    """The diffusion keys of a LoRA file whose module no family's rules match (what to name when a
    LoRA of no known family is refused)."""
    unknown = []
    for key in keys:
        parts = split_lora_key(key)
        if not is_text_encoder_key(key) and (parts is None or family_of_modules([parts[0]]) is None):
            unknown.append(key)
    return unknown


def model_family(weight_keys: Iterable[str], prefix: str = "diffusion_model.") -> str | None:
    """The family of a model from its canonical state-dict keys (under ``prefix``)."""
    return family_of_modules(k[len(prefix):].removesuffix(".weight") for k in weight_keys if k.startswith(prefix))
