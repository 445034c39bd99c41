"""``compare``'s table, from finished runs' files."""
import json

from tokmask_peft.comparison import compare_table, directory_mb, method_row


def fake_run(path, wf1, trainable, total, weights_bytes):
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({
        "best": {"weighted_f1": wf1, "macro_f1": wf1 - 0.1}, "trainable_params": trainable, "total_params": total,
        "wall_time_s": 12.5, "peak_memory_mb": 900.0}))
    (path / "adapter_model.safetensors").write_bytes(b"\0" * weights_bytes)
    (path / "log.jsonl").write_text("x" * 10**6)  # logs are not what a user ships
    return path


def test_rows_and_table_from_finished_runs(tmp_path):
    full = method_row("full", fake_run(tmp_path / "full", 0.7, 1000, 1000, 2**20))
    lora = method_row("lora", fake_run(tmp_path / "lora", 0.65, 10, 1010, 2**18))
    assert full["disk_mb"] > 1.0 and lora["disk_mb"] < 0.3  # the log is left out of the size
    table = compare_table([full, lora]).splitlines()
    assert table[0].startswith("| method | dev weighted F1 | dev macro F1 | trainable params | % of total")
    assert table[2] == "| full | 0.7000 | 0.6000 | 1,000 | 100.00 | 12.5 | 900 | 1.0 |"
    assert table[3].startswith("| lora | 0.6500 | 0.5500 | 10 | 0.99 |")
    assert directory_mb(tmp_path / "lora") == lora["disk_mb"]
