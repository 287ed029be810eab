"""The six Hugging Face loaders, on small files in each data set's own layout loaded through `load_dataset`."""

from __future__ import annotations

import json

import pytest

from data.errors import LoramuxDataError
from data.tasks import load_split, split_sizes, use_hub


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    def make(name, train, test=None):
        out = {"train": _jsonl(tmp_path / f"{name}-train.jsonl", train)}
        if test is not None:
            out["test"] = _jsonl(tmp_path / f"{name}-test.jsonl", test)
        return out

    return make


def test_gsm8k_keeps_its_test_split(files):
    train = [{"question": f"What is {i}+{i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(20)]
    test = [{"question": f"What is {i}*2?", "answer": f"#### {2 * i}"} for i in range(100, 105)]
    data = files("gsm8k", train, test)
    ds = load_split("gsm8k", "test", hf_data_files=data)
    assert sorted(ds["prompt"]) == sorted(f"[INST] What is {i}*2? [/INST]\n" for i in range(100, 105))
    assert {a.split("#### ")[1] for a in ds["answer"]} == {str(2 * i) for i in range(100, 105)}
    tr = load_split("gsm8k", "train", hf_data_files=data)
    va = load_split("gsm8k", "val", hf_data_files=data)
    assert len(tr) == 18 and len(va) == 2 and not set(tr["prompt"]) & set(va["prompt"])
    assert set(ds["choices"][0]) == set()


def test_cnn_dailymail_uses_meteora_prompt(files):
    rows = [{"article": f"Article {i} text.", "highlights": f"Summary {i}.", "id": str(i)} for i in range(10)]
    ds = load_split("cnn_dailymail", "test", hf_data_files=files("cnn", rows, rows[:4]))
    assert ds[0]["prompt"].startswith("[INST] Generate a summarization of the news article.\nArticle ")
    assert ds[0]["prompt"].endswith(" [/INST]\n") and ds[0]["answer"].startswith("Summary ")


def test_alpaca_has_no_test_split_so_20_percent_is_held_out(files):
    rows = [{"instruction": f"Do thing {i}.", "input": "with this" if i % 2 else "", "output": f"done {i}"}
            for i in range(50)]
    data = files("alpaca", rows)
    sizes = {s: len(load_split("alpaca", s, hf_data_files=data)) for s in ("train", "val", "test")}
    assert sizes == {"train": 36, "val": 4, "test": 10}
    prompts = [p for s in ("train", "val", "test") for p in load_split("alpaca", s, hf_data_files=data)["prompt"]]
    assert "[INST] Do thing 1.\nwith this [/INST]\n" in prompts and "[INST] Do thing 2. [/INST]\n" in prompts
    assert all("\n [/INST]" not in p for p in prompts)  # no dangling newline when input is empty


@pytest.mark.parametrize(("lang", "lead"), [("de", "Den folgenden Text ins Englische übersetzen.\n"),
                                            ("es", "Traduce el siguiente texto al inglés.\n"),
                                            ("it", "Traduci il seguente testo in inglese.\n")])
def test_news_commentary_translates_to_english(files, lang, lead):
    rows = [{"id": str(i), "translation": {lang: f"satz {i}", "en": f"sentence {i}"}} for i in range(10)]
    ds = load_split(f"news_commentary_{lang}", "test", hf_data_files=files(f"news-{lang}", rows))
    assert len(ds) == 2
    row = ds[0]
    n = row["prompt"].split("satz ")[1].split(" ")[0]
    assert row["prompt"] == f"[INST] {lead}satz {n} [/INST]\n" and row["answer"] == f"sentence {n}"


def test_parquet_files_go_through_the_same_loader(tmp_path):
    import datasets

    rows = {"question": [f"q{i}" for i in range(10)], "answer": [f"#### {i}" for i in range(10)]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "test.parquet"))
    data = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    assert len(load_split("gsm8k", "test", hf_data_files=data)) == 10


def test_wrong_layout_is_one_clear_error(files):
    data = files("bad", [{"prompt": "x", "completion": "y"}] * 5)
    with pytest.raises(LoramuxDataError, match=r"row 0 of split 'train' lacks field 'instruction'.*HFSpec"):
        load_split("alpaca", "train", hf_data_files=data)
    with pytest.raises(LoramuxDataError, match=r"has no split 'test'"):
        load_split("gsm8k", "test", hf_data_files=files("gsm-nosplit", [{"question": "q", "answer": "a"}]))


def test_hub_use_follows_env(monkeypatch):
    monkeypatch.setenv("LORAMUX_USE_HUB", "1")
    assert use_hub()
    monkeypatch.setenv("LORAMUX_USE_HUB", "0")
    assert not use_hub()
    monkeypatch.setenv("LORAMUX_USE_HUB", "auto")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert not use_hub()


def test_hub_failure_names_the_offline_switch(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the hub is unreachable here; loading must fail clearly
    with pytest.raises(LoramuxDataError, match=r"cannot load openai/gsm8k/main from the Hugging Face hub.*LORAMUX_USE_HUB=0"):
        split_sizes("gsm8k", hub=True)
