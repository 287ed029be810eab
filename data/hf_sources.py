"""The six Hugging Face data sets of MeteoRA, loaded with `datasets.load_dataset` and turned into rows.

`load_hf_rows(spec)` returns {"train": rows, "test": rows} (no "test" where the data set has none). Each row is
{inputs, answer, choices=[]}, with MeteoRA's field choices:

    gsm8k            question -> answer (the worked solution ending in "#### N"; scored on N)
    cnn_dailymail    article -> highlights
    alpaca           instruction + "\\n" + input (when there is one) -> output
    news_commentary  translation[xx] -> translation["en"]

`data_files` loads the same layout from local json/parquet files through `load_dataset("json"|"parquet", ...)`
instead of the hub: the tests use it, and so can anyone with a local copy.
"""

from __future__ import annotations

from functools import lru_cache

from data.errors import LoramuxDataError
from data.task_table import HFSpec


def _convert(fields: str, row: dict) -> tuple[str, str]:
    if fields == "gsm8k":
        return row["question"], row["answer"]
    if fields == "cnn_dailymail":
        return row["article"], row["highlights"]
    if fields == "alpaca":
        extra = row.get("input") or ""
        return row["instruction"] + ("\n" + extra if extra else ""), row["output"]
    if fields.startswith("translation:"):
        lang = fields.split(":", 1)[1]
        return row["translation"][lang], row["translation"]["en"]
    raise LoramuxDataError(f"unknown HF row layout {fields!r}; fix the HFSpec in data/task_table.py")


def load_hf_rows(spec: HFSpec, data_files: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """Load and convert the data set's train (and test) split; `data_files` = local files instead of the hub.

    Read once per process (cached): train, val and test of one task come from the same load.
    """
    files = None if data_files is None else tuple(sorted((k, str(v)) for k, v in data_files.items()))
    return _load_hf_rows(spec, files)


@lru_cache(maxsize=8)
def _load_hf_rows(spec: HFSpec, files: tuple | None) -> dict[str, list[dict]]:
    from datasets import load_dataset  # lazy: slow to import; used only with the hub

    data_files = dict(files) if files else None

    if data_files:
        first = next(iter(data_files.values()))
        builder = "parquet" if str(first).endswith(".parquet") else "json"
        dsd = load_dataset(builder, data_files=data_files)
    else:
        try:
            dsd = load_dataset(spec.path, spec.name)
        except Exception as err:  # the hub's failures come in many types; all mean the same to the user
            raise LoramuxDataError(
                f"cannot load {spec.path}{'/' + spec.name if spec.name else ''} from the Hugging Face hub "
                f"({type(err).__name__}); set LORAMUX_USE_HUB=0 to use the task's BIG-bench substitute"
            ) from err
    out = {}
    for role, split in (("train", spec.train_split), ("test", spec.test_split)):
        if split is None:
            continue
        if split not in dsd:
            raise LoramuxDataError(
                f"{spec.path} has no split {split!r} (has {sorted(dsd)}); fix the HFSpec in data/task_table.py"
            )
        ds = dsd[split]
        cap = spec.cap if role == "train" else spec.test_cap
        if cap is not None and len(ds) > cap:
            ds = ds.select(range(cap))
        rows = []
        for i, row in enumerate(ds):
            try:
                inputs, answer = _convert(spec.fields, row)
            except (KeyError, TypeError) as err:
                raise LoramuxDataError(
                    f"{spec.path} row {i} of split {split!r} lacks field {err} expected by layout {spec.fields!r}; "
                    "check the data files or the HFSpec in data/task_table.py"
                ) from err
            rows.append({"inputs": str(inputs), "answer": str(answer), "choices": []})
        out[role] = rows
    return out
