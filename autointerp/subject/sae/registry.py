"""The SAE architectures we encode, by name. Adding one: a module with its `SPEC`, its name in `SAEArchitecture`
and its entry below."""

from __future__ import annotations

from typing import Literal

from autointerp.subject.sae import groupmax, jumprelu, relu, topk
from autointerp.subject.sae.specs import ArchSpec

SAEArchitecture = Literal["relu", "topk", "jumprelu", "groupmax"]

SAE_ARCHITECTURES: dict[str, ArchSpec] = {
    relu.SPEC.name: relu.SPEC,
    topk.SPEC.name: topk.SPEC,
    jumprelu.SPEC.name: jumprelu.SPEC,
    groupmax.SPEC.name: groupmax.SPEC,
}
