"""``tokmask predict``'s file handling, without a model: rows in, one row out per row, columns carried."""
import io

import pytest

from tokmask_peft.predict_files import (INPUT_FORMATS, OUTPUT_FORMATS, input_format, output_format, output_rows,
                                        read_rows, write_csv, write_jsonl)


def rows_of(text: str, fmt: str, column: str = "text", task: str = "sequence"):
    return read_rows(io.BytesIO(text.encode()), "in." + fmt, fmt, column, task)


def test_formats_come_from_the_suffix_unless_given():
    assert [input_format(p, None) for p in ("a.csv", "a.TSV", "a.ndjson", "-", "a.weird")] == [
        "csv", "tsv", "jsonl", "text", "text"]
    assert input_format("a.csv", "jsonl") == "jsonl" and {"text", "csv", "tsv", "jsonl"} == set(INPUT_FORMATS)
    assert output_format("out.csv", None) == "csv" and output_format("-", None) == "jsonl"
    assert set(OUTPUT_FORMATS) == {"csv", "jsonl"}


def test_csv_rows_keep_their_columns_and_line_numbers_and_blank_text_is_marked():
    rows = rows_of('id,text\n7,"good, very good"\n8,  \n9,bad\n', "csv")
    assert [r.text for r in rows] == ["good, very good", None, "bad"]
    assert rows[0].label == {"id": "7", "text": "good, very good"} and rows[2].source == "in.csv:4"


def test_jsonl_and_text_inputs_and_token_tasks_read_words():
    rows = rows_of('{"id": 1, "tokens": ["que", "buena"]}\n\n{"id": 2, "tokens": "el movie"}\n', "jsonl",
                   column="tokens", task="token")
    assert [r.text for r in rows] == [["que", "buena"], ["el", "movie"]]
    assert [r.text for r in rows_of("one\n\ntwo\n", "text")] == ["one", None, "two"]


@pytest.mark.parametrize("text,fmt,message", [
    ("id,words\n1,a\n", "csv", r"in.csv:1: no column 'text' \(columns: \['id', 'words'\]\)"),
    ('{"text": 3}\n', "jsonl", "in.jsonl:1: column 'text' holds 3; expected a string"),
    ('{"id": 1}\n', "jsonl", r"in.jsonl:1: no field 'text' \(found \['id'\]\)"),
    ("{oops\n", "jsonl", "in.jsonl:1: not valid JSON"),
    ("text\na,b\n", "csv", "in.csv:2: more fields than the header's 1"),
])
def test_bad_rows_are_named_by_file_and_line(text, fmt, message):
    with pytest.raises(ValueError, match=message):
        rows_of(text, fmt)


def test_output_rows_carry_fields_through_and_write_as_jsonl_and_csv():
    rows = rows_of("id,text\n1,good\n2, \n", "csv")
    results = [{"label": "positive", "probs": {"negative": 0.25, "positive": 0.75}, "truncated": False}, None]
    records = list(output_rows(rows, results, "mask_0.10", "sequence"))
    assert records[1] == {"id": "2", "text": " ", "label": None, "error": "empty text", "adapter": "mask_0.10"}
    out = io.StringIO()
    write_csv(out, records, ["negative", "positive"])
    lines = out.getvalue().splitlines()
    assert lines[0] == "id,text,label,truncated,adapter,prob_negative,prob_positive,error"
    assert lines[1] == "1,good,positive,False,mask_0.10,0.25,0.75,"
    out = io.StringIO()
    write_jsonl(out, iter(records))
    assert out.getvalue().count("\n") == 2 and '"adapter": "mask_0.10"' in out.getvalue()


def test_a_row_short_of_the_text_column_gets_its_own_error_and_the_file_goes_on():
    rows = rows_of("id,label,text\n1,x,good\n2,y\n3,z,bad\n", "csv")
    assert [r.text for r in rows] == ["good", None, "bad"]
    records = list(output_rows(rows, [{"label": "p"}, None, {"label": "n"}], "a", "sequence"))
    assert records[1] == {"id": "2", "label": None, "error": "no value for column 'text'", "adapter": "a"}
    assert [r["label"] for r in records] == ["p", None, "n"]


def test_bytes_that_are_not_utf8_name_predicts_own_option_and_can_be_replaced():
    data = "text\ncafé\n".encode("latin-1")
    with pytest.raises(ValueError, match=r"in.csv:2: bytes that are not UTF-8.*set --encoding-errors=replace"):
        read_rows(io.BytesIO(data), "in.csv", "csv", "text", "sequence")
    with pytest.warns(UserWarning, match="--encoding-errors=replace"):
        rows = read_rows(io.BytesIO(data), "in.csv", "csv", "text", "sequence", encoding_errors="replace")
    assert rows[0].text == "caf\ufffd"
