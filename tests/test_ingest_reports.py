"""Reports and labels keyed by study: file formats, column options, matching, sentence splitting."""
from __future__ import annotations

import json

import pytest

from hlip_core.data import read_reports, split_sentences
from hlip_core.data.reports import match_report
from realdata import CT_RATE_EXCERPT_ROWS, ct_rate_labels_csv


def test_sentences_split_at_full_stops_but_not_inside_numbers_or_abbreviations():
    text = ("Findings: A 3.5 cm mass in the left upper lobe, e.g. near the hilum. No effusion! "
            "Compared with Dr. Smith's study vs. 2019; stable. 2 nodules remain.")
    assert split_sentences(text) == [
        "Findings: A 3.5 cm mass in the left upper lobe, e.g. near the hilum.",
        "No effusion!",
        "Compared with Dr. Smith's study vs. 2019; stable.",
        "2 nodules remain.",
    ]


def test_sentences_split_at_list_items_and_section_lines():
    text = "FINDINGS:\n- Small infarct in the right MCA territory\n- No haemorrhage.\n\nIMPRESSION:\n1. Acute stroke."
    assert split_sentences(text) == ["FINDINGS:", "Small infarct in the right MCA territory", "No haemorrhage.",
                                     "IMPRESSION:", "Acute stroke."]


@pytest.mark.parametrize("text", [None, "", "   \n  "])
def test_no_report_gives_no_sentences(text):
    assert split_sentences(text) == []


def test_reports_from_csv_with_chosen_columns_and_labels(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("AccessionNumber,Impression,ich,midline,fold\nA1,Bleed.,1,yes,train\nA2,Normal.,0,,valid\nA1,dup,0,0,x\n")
    table = read_reports(path, key_column="AccessionNumber", report_column="Impression", label_columns=["ich", "midline"],
                         split_column="fold")
    assert set(table) == {"A1", "A2"}
    assert table["A1"].report == "Bleed." and table["A1"].labels == {"ich": 1, "midline": 1} and table["A1"].split == "train"
    assert table["A2"].labels == {"ich": 0}  # an empty cell is unknown, not 0


def test_reports_from_json_object_and_jsonl(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"case1": "One. Two.", "case2": {"report": "Three.", "x": 1}}))
    table = read_reports(tmp_path / "r.json", label_columns=None)
    assert table["case1"].report == "One. Two." and table["case2"].report == "Three."
    (tmp_path / "r.jsonl").write_text('{"uid": "1.2.3", "report": "Fine."}\n\n{"uid": "1.2.4", "report": null}\n')
    table = read_reports(tmp_path / "r.jsonl", key_column="uid")
    assert table["1.2.3"].report == "Fine." and table["1.2.4"].report is None


def test_a_missing_column_is_named_with_the_columns_there_are(tmp_path):
    (tmp_path / "r.csv").write_text("id,text\n1,a\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['report'\]; its columns are \['id', 'text'\]"):
        read_reports(tmp_path / "r.csv", key_column="id")


def test_a_label_that_is_no_number_is_refused_with_its_row(tmp_path):
    (tmp_path / "r.csv").write_text("study_id,report,ich\ns1,a,maybe\n")
    with pytest.raises(ValueError, match="row 1, column 'ich'"):
        read_reports(tmp_path / "r.csv", label_columns=["ich"])


def test_matching_tries_the_study_keys_in_order_or_the_one_asked_for():
    table = read_reports_from_rows({"ACC9": "by accession", "folder_a": "by folder"})
    candidates = {"study_id": "1.2.3", "study_uid": "1.2.3", "accession": "ACC9", "folder": "x/folder_a", "folder_name": "folder_a"}
    row, field = match_report(table, candidates)
    assert (row.report, field) == ("by accession", "accession")
    row, field = match_report(table, candidates, "folder_name")
    assert (row.report, field) == ("by folder", "folder_name")
    assert match_report(table, {**candidates, "accession": None}, "accession") == (None, None)
    with pytest.raises(ValueError):
        match_report(table, candidates, "patient_name")


def read_reports_from_rows(rows: dict):
    from hlip_core.data.reports import ReportRow

    return {k: ReportRow(v) for k, v in rows.items()}


def test_the_real_ct_rate_label_file_reads_as_labels_by_volume_name():
    columns = ["Cardiomegaly", "Lung nodule", "Pleural effusion"]
    table = read_reports(ct_rate_labels_csv(), key_column="VolumeName", report_column=None, label_columns=columns)
    assert len(table) == CT_RATE_EXCERPT_ROWS
    row = table["valid_1_a_1.nii.gz"]
    assert row.report is None and set(row.labels) == set(columns) and set(row.labels.values()) <= {0, 1}
