"""The tissue registry: the one place that says which tissues exist.

Every other module (the network, checkpoints, datasets, label stores, exports)
refers to tissues by name through this registry.  A checkpoint stores the tissues
it was trained for, so adding a tissue here changes new models only; models already
trained keep the list written in their sidecar.

Magnifications map to a *scale id*, the position of the scale in the network's
scale one-hot code: 0 = 5x, 1 = 10x, 2 = 20x, 3 = 40x.  Pixel sizes are nominal
(40x is 0.25 um/px); slides are always read with their own measured um/px.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterable, Sequence

#: magnification (x) -> nominal microns per pixel
MAGNIFICATIONS: dict[int, float] = {5: 2.0, 10: 1.0, 20: 0.5, 40: 0.25}
#: magnification (x) -> scale id used by the scale-aware controller
SCALE_IDS: dict[int, int] = {5: 0, 10: 1, 20: 2, 40: 3}
N_SCALES = len(SCALE_IDS)


@dataclass(frozen=True)
class Tissue:
    """One segmentable tissue type."""

    id: int
    name: str  #: canonical name used in files, layers and manifests
    short: str  #: short code used in folder names and tables
    label: str  #: human-readable label
    magnification: int  #: objective magnification the model sees it at (5, 10, 20, 40)
    color: str  #: display colour, "#rrggbb"
    aliases: tuple[str, ...] = ()
    #: name of a tissue this one lies inside (the tuft lies inside the glomerular unit);
    #: used by the complete label map, where the inner tissue is drawn over its container
    inside: str | None = None
    #: names of tissues that never share a pixel with this one (distinct structures).
    #: The relation is symmetric: :func:`exclusive` checks both sides.  Training turns
    #: it into supervision: a labelled pixel of this tissue is background for those.
    excludes: tuple[str, ...] = ()

    @property
    def mpp(self) -> float:
        """Nominal microns per pixel at this tissue's magnification."""
        return MAGNIFICATIONS[self.magnification]

    @property
    def scale_id(self) -> int:
        return SCALE_IDS[self.magnification]

    @property
    def short_label(self) -> str:
        """The label without its parenthesised detail: layer names and narrow docks."""
        return self.label.split(" (")[0]

    @property
    def rgb(self) -> tuple[int, int, int]:
        c = self.color.lstrip("#")
        return (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        d["excludes"] = list(self.excludes)
        d["mpp"] = self.mpp
        d["scale_id"] = self.scale_id
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Tissue":
        return cls(
            id=int(d["id"]),
            name=str(d["name"]),
            short=str(d.get("short", d["name"])),
            label=str(d.get("label", d["name"])),
            magnification=int(d["magnification"]),
            color=str(d.get("color", "#ffffff")),
            aliases=tuple(d.get("aliases", ())),
            inside=d.get("inside"),
            excludes=tuple(str(v) for v in d.get("excludes", ())),
        )


_SEPARATE = ("distal_tubule", "proximal_tubule", "glomerular_unit", "artery", "peritubular_capillary")


def _others(name: str) -> tuple[str, ...]:
    return tuple(n for n in _SEPARATE if n != name)


TISSUES: tuple[Tissue, ...] = (
    Tissue(0, "distal_tubule", "dt", "Distal tubule", 10, "#1f77ff", ("distal", "dt"), excludes=_others("distal_tubule")),
    Tissue(1, "proximal_tubule", "pt", "Proximal tubule", 10, "#2ca02c", ("proximal", "pt"),
           excludes=_others("proximal_tubule")),
    Tissue(2, "glomerular_unit", "cap", "Glomerular unit (with Bowman capsule)", 5, "#ffbf00", ("capsule", "cap"),
           excludes=_others("glomerular_unit")),
    Tissue(3, "glomerular_tuft", "tuft", "Glomerular tuft", 5, "#d62728", ("tuft",), inside="glomerular_unit",
           excludes=("distal_tubule", "proximal_tubule", "artery", "peritubular_capillary")),
    Tissue(4, "artery", "ves", "Artery / arteriole", 10, "#9467bd", ("vessel", "ves", "arteriole"),
           excludes=_others("artery")),
    Tissue(5, "peritubular_capillary", "ptc", "Peritubular capillary", 40, "#17becf", ("ptc", "capillary"),
           excludes=_others("peritubular_capillary")),
)


class UnknownTissueError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def _lookup(tissues: Sequence[Tissue], key: "str | int | Tissue") -> Tissue:
    if isinstance(key, Tissue):
        return key
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        i = int(key)
        for t in tissues:
            if t.id == i:
                return t
    else:
        k = str(key).strip().lower().replace(" ", "_").replace("-", "_")
        for t in tissues:
            if k in (t.name, t.short) or k in t.aliases:
                return t
    names = ", ".join(t.name for t in tissues)
    raise UnknownTissueError(f"unknown tissue {key!r}; known tissues: {names}")


def get_tissue(key: "str | int | Tissue", tissues: Sequence[Tissue] = TISSUES) -> Tissue:
    """Find a tissue by id, name, short code or alias (case-insensitive)."""
    return _lookup(tissues, key)


def resolve_tissues(keys: "Iterable[str | int | Tissue] | None", tissues: Sequence[Tissue] = TISSUES) -> list[Tissue]:
    """Resolve a user's tissue list (``None`` or empty means all), keeping registry order."""
    if not keys:
        return list(tissues)
    wanted = {_lookup(tissues, k).id for k in keys}
    return [t for t in tissues if t.id in wanted]


def exclusive(a: Tissue, b: Tissue) -> bool:
    """True when the registry says ``a`` and ``b`` never share a pixel (either side may say it)."""
    return a.name != b.name and (b.name in a.excludes or a.name in b.excludes)


def with_registry_relations(tissues: Sequence[Tissue], registry: Sequence[Tissue] = TISSUES) -> tuple[Tissue, ...]:
    """``tissues`` with the registry's relations added to those of the same name.

    A checkpoint stores its tissue definitions; one written before a relation was in
    the registry lacks it (the shipped model's tissues have no ``excludes``). The
    relations are anatomy, not a property of one model, so training takes the union
    of both: a tissue the registry does not know keeps exactly its own."""
    by_name = {t.name: t for t in registry}
    out = []
    for t in tissues:
        r = by_name.get(t.name)
        if r is not None:
            t = replace(t, excludes=tuple(dict.fromkeys(t.excludes + r.excludes)), inside=t.inside or r.inside)
        out.append(t)
    return tuple(out)


def contains(outer: Tissue, inner: Tissue) -> bool:
    """True when ``inner`` lies inside ``outer`` (every ``inner`` pixel is an ``outer`` pixel)."""
    return inner.inside == outer.name


def encloses_another(t: Tissue, tissues: Sequence[Tissue] = TISSUES) -> bool:
    """True when some tissue of ``tissues`` lies inside ``t`` (the glomerular unit holds
    the tuft): the viewer draws such a tissue as an outline so the inner one stays visible."""
    return any(contains(t, o) for o in tissues)


def tissue_names(tissues: Sequence[Tissue] = TISSUES) -> list[str]:
    return [t.name for t in tissues]


def tissues_to_json(tissues: Sequence[Tissue] = TISSUES) -> list[dict]:
    return [t.to_dict() for t in tissues]


def tissues_from_json(items: Sequence[dict]) -> tuple[Tissue, ...]:
    ts = tuple(Tissue.from_dict(d) for d in items)
    ids = [t.id for t in ts]
    if ids != list(range(len(ts))):
        raise ValueError(f"tissue ids must be 0..{len(ts) - 1} in order, got {ids}")
    return ts


def magnification_groups(tissues: Sequence[Tissue]) -> dict[int, list[Tissue]]:
    """Tissues grouped by magnification (coarsest first): one backbone pass per group."""
    groups: dict[int, list[Tissue]] = {}
    for t in sorted(tissues, key=lambda t: (t.magnification, t.id)):
        groups.setdefault(t.magnification, []).append(t)
    return groups
