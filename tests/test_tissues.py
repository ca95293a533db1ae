import pytest

from napari_omniseg.tissues import (
    TISSUES,
    Tissue,
    UnknownTissueError,
    get_tissue,
    magnification_groups,
    resolve_tissues,
    tissues_from_json,
    tissues_to_json,
)


def test_six_tissues_with_method_magnifications():
    assert [t.short for t in TISSUES] == ["dt", "pt", "cap", "tuft", "ves", "ptc"]
    assert [t.magnification for t in TISSUES] == [10, 10, 5, 5, 10, 40]
    assert [t.scale_id for t in TISSUES] == [1, 1, 0, 0, 1, 3]
    assert get_tissue("ptc").mpp == 0.25 and get_tissue("capsule").mpp == 2.0


def test_lookup_by_id_name_short_alias():
    assert get_tissue(3).name == "glomerular_tuft"
    assert get_tissue("Proximal Tubule").id == 1
    assert get_tissue("vessel").name == "artery"
    with pytest.raises(UnknownTissueError, match="unknown tissue 'kidney'.*distal_tubule"):
        get_tissue("kidney")


def test_resolve_keeps_registry_order_and_groups_by_magnification():
    assert [t.id for t in resolve_tissues(["ptc", "dt", "tuft"])] == [0, 3, 5]
    g = magnification_groups(TISSUES)
    assert list(g) == [5, 10, 40]
    assert [t.short for t in g[10]] == ["dt", "pt", "ves"]


def test_json_round_trip_and_seventh_tissue():
    seven = TISSUES + (Tissue(6, "interstitium", "int", "Interstitium", 20, "#aaaaaa"),)
    back = tissues_from_json(tissues_to_json(seven))
    assert back == seven and back[6].scale_id == 2
    with pytest.raises(ValueError, match="ids must be 0..1"):
        tissues_from_json([TISSUES[0].to_dict(), TISSUES[2].to_dict()])
