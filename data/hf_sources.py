"""The six Hugging Face data sets of MeteoRA, loaded with `datasets.load_dataset` and turned into rows.

`load_hf_rows(spec)` returns {"train": rows, "test": rows} (no "test" where the data set has none). Each row is
{inputs, answer, choices=[]}, with MeteoRA's field choices (REFERENCE §1.2):

    gsm8k            question -> answer (the worked solution ending in "#### N"; scored on N)
    cnn_dailymail    article -> highlights
    alpaca           instruction + "\\n" + input (when there is one) -> output
    news_commentary  translation[xx] -> translation["en"]

`data_files` loads the same layout from local json/parquet files through `load_dataset("json"|"parquet", ...)`
instead of the hub: the tests use it, and so can anyone with a local copy.
"""

from __future__ import annotations

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
    """Load and convert the data set's train (and test) split; `data_files` = local files instead of the hub."""
    from datasets import load_dataset

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
        if spec.cap is not None and len(ds) > spec.cap:
            ds = ds.select(range(spec.cap))
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
