import pytest

from slidemil.cohort.sheet import SheetError, load_sheet


def _write(tmp_path, text):
    (tmp_path / "a.svs").write_bytes(b"x")
    p = tmp_path / "sheet.csv"
    p.write_text(text)
    return p


def test_relative_paths_resolve_against_sheet(tmp_path):
    sheet = load_sheet(_write(tmp_path, "slide_id,patient_id,path,label\ns1,p1,a.svs,1\n"))
    assert sheet.loc[0, "path"] == str(tmp_path / "a.svs")
    assert sheet.loc[0, "slide_id"] == "s1"


def test_all_problems_listed_at_once(tmp_path):
    text = ("slide_id,patient_id,path,label\n"
            "s1,p1,a.svs,1\n"
            "s1,p2,a.svs,0\n"
            "s2,p1,missing.svs,0\n")
    with pytest.raises(SheetError) as info:
        load_sheet(_write(tmp_path, text))
    msg = str(info.value)
    assert "sheet.csv" in msg
    assert "duplicate slide_id(s): s1" in msg
    assert "patient(s) with different labels on their slides: p1" in msg
    assert "missing.svs" in msg
    assert len(info.value.problems) == 3


def test_missing_columns(tmp_path):
    with pytest.raises(SheetError, match="missing column.*label"):
        load_sheet(_write(tmp_path, "slide_id,patient_id,path\ns1,p1,a.svs\n"))


def test_missing_sheet(tmp_path):
    with pytest.raises(SheetError, match="not found"):
        load_sheet(tmp_path / "nope.csv")
