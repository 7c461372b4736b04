"""Tests for llm_pruning.data: sources, private shards and token segments."""

from __future__ import annotations

import json
import string
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch

from llm_pruning.data import (
    calibration_segments,
    eval_tokens,
    load_documents,
    pooled_segments,
    sample_segments,
    shard_documents,
    tokenize,
)
from llm_pruning.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def write_letter_documents(directory: Path, count: int, length: int = 200) -> list[str]:
    """``count`` files named so that sorted order is a, b, c, ...; file k repeats letter k."""
    directory.mkdir(parents=True, exist_ok=True)
    documents = []
    for index in range(count):
        letter = string.ascii_lowercase[index]
        documents.append(letter * length)
        (directory / f"{index:02d}-{letter}.txt").write_text(documents[-1], encoding="utf-8")
    return documents


def decoded_letters(segments: torch.Tensor, tokenizer) -> set[str]:
    return {char for row in segments for char in tokenizer.decode(row.tolist())} - {"\n"}


# --- sources ---------------------------------------------------------------------------------


def test_python_docs_train_and_eval_topics_are_disjoint_and_cover_all():
    train = load_documents("python-docs", split="train")
    held_out = load_documents("python-docs", split="eval")
    assert train and held_out
    assert not set(train) & set(held_out)
    names = sorted(topics)
    # Every fifth topic, starting with the third, is held out.
    assert held_out == [topics[name] for name in names[2::5]]
    assert len(train) + len(held_out) == len(names)


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        load_documents("python-docs", split="test")


def test_local_txt_file(tmp_path: Path):
    path = tmp_path / "novel.txt"
    path.write_text("Chapter 1\n\nIt is a truth universally acknowledged.\n", encoding="utf-8")
    assert load_documents(str(path)) == ["Chapter 1\n\nIt is a truth universally acknowledged.\n"]


def test_local_jsonl_one_document_per_line(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    texts = ["first document", "second\nwith a newline", "third: ünïcödé \u2028 separator \x85"]
    lines = [
        json.dumps({"text": text, "id": i}, ensure_ascii=False) for i, text in enumerate(texts)
    ]
    # A blank line and a whitespace-only document are skipped.
    path.write_text(
        "\n".join([lines[0], "", lines[1], json.dumps({"text": "  "}), lines[2]]) + "\n"
    )
    assert load_documents(str(path)) == texts


def test_local_directory_in_sorted_name_order(tmp_path: Path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "ay one"}\n{"text": "ay two"}\n')
    (tmp_path / "c.txt").write_text("sea", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_documents(str(tmp_path)) == ["ay one", "ay two", "bee", "sea"]


def test_directory_without_text_files(tmp_path: Path):
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        load_documents(str(tmp_path))


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ('{"text": "ok"}\n{"text": "broken\n', 2, "not valid JSON"),
        ('{"text": "ok"}\n\n{"body": "no text field"}\n', 3, "string field 'text'"),
        ('["a list"]\n', 1, "string field 'text'"),
        ('{"text": 42}\n', 1, "string field 'text'"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, content: str, line: int, reason: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=f"bad.jsonl:{line}: .*{reason}"):
        load_documents(str(path))


@pytest.mark.parametrize("spec", ["missing.txt", "./missing", "/nonexistent/dir/docs.jsonl"])
def test_missing_local_path(tmp_path: Path, monkeypatch, spec: str):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing|nonexistent"):
        load_documents(spec)


def test_empty_text_file(tmp_path: Path):
    path = tmp_path / "empty.txt"
    path.write_text("   \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        load_documents(str(path))


# --- shards ----------------------------------------------------------------------------------


def test_shard_documents_round_robin():
    documents = ["d0", "d1", "d2", "d3", "d4"]
    assert shard_documents(documents, 0, 2) == ["d0", "d2", "d4"]
    assert shard_documents(documents, 1, 2) == ["d1", "d3"]
    assert shard_documents(documents, 2, 3) == ["d2"]


def test_shard_documents_too_few_documents_suggests_iid():
    with pytest.raises(ValueError, match="iid"):
        shard_documents(["only", "two"], 0, 3)


@pytest.mark.parametrize(("partition_id", "num_partitions"), [(2, 2), (-1, 2), (0, 0)])
def test_bad_partition_id(partition_id: int, num_partitions: int, tokenizer):
    with pytest.raises(ValueError, match="partition-id"):
        shard_documents(["a", "b", "c"], partition_id, num_partitions)
    with pytest.raises(ValueError, match="partition-id"):
        calibration_segments(
            "python-docs",
            tokenizer,
            seqlen=16,
            num_segments=2,
            partition_id=partition_id,
            num_partitions=num_partitions,
        )


def test_unknown_partition_scheme(tokenizer):
    with pytest.raises(ValueError, match="by-document, iid"):
        calibration_segments(
            "python-docs", tokenizer, seqlen=16, num_segments=2, partition="random"
        )


# --- tokens and segments ---------------------------------------------------------------------


def test_tokenize_joins_documents_with_blank_lines(tokenizer):
    ids = tokenize(["ab", "ç"], tokenizer)
    assert ids.dtype == torch.long
    assert ids.shape == (len("ab\n\nç".encode()),)
    assert tokenizer.decode(ids.tolist()) == "ab\n\nç"


def test_sample_segments_are_windows_of_the_stream():
    tokens = torch.arange(100)
    segments = sample_segments(tokens, 10, 6, np.random.default_rng(3))
    assert segments.shape == (6, 10)
    for row in segments:  # contiguous windows of the stream, anywhere from 0 to 90
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10))
    same = sample_segments(tokens, 10, 6, np.random.default_rng(3))
    assert torch.equal(segments, same)


def test_more_windows_than_text_warns(caplog):
    tokens = torch.arange(100)
    with caplog.at_level("WARNING", logger="llm_pruning.data"):
        sample_segments(tokens, 10, 10, np.random.default_rng(0))  # 10 x 10 = 100: fits
        assert not caplog.records
        sample_segments(tokens, 10, 11, np.random.default_rng(0))  # 110 > 100
    assert len(caplog.records) == 1
    assert "need 110 tokens, but the text has 100" in caplog.records[0].getMessage()


def test_text_shorter_than_seqlen(tokenizer, tmp_path: Path):
    path = tmp_path / "short.txt"
    path.write_text("only a few bytes", encoding="utf-8")
    with pytest.raises(ValueError, match="too short"):
        calibration_segments(str(path), tokenizer, seqlen=64, num_segments=1)
    with pytest.raises(ValueError, match="calib-samples"):
        sample_segments(torch.arange(100), 10, 0, np.random.default_rng(0))


def test_calibration_segments_deterministic_and_private(tokenizer):
    kwargs = {"seqlen": 32, "num_segments": 5, "num_partitions": 3, "seed": 11}
    first = calibration_segments("python-docs", tokenizer, partition_id=1, **kwargs)
    again = calibration_segments("python-docs", tokenizer, partition_id=1, **kwargs)
    other_client = calibration_segments("python-docs", tokenizer, partition_id=2, **kwargs)
    other_seed = calibration_segments(
        "python-docs", tokenizer, partition_id=1, **{**kwargs, "seed": 12}
    )
    assert first.shape == (5, 32) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other_client)
    assert not torch.equal(first, other_seed)


def test_by_document_segments_come_from_own_documents_only(tokenizer, tmp_path: Path):
    write_letter_documents(tmp_path, 5)  # files a..e; client 0 of 2 gets a, c, e
    kwargs = {"seqlen": 64, "num_segments": 20, "num_partitions": 2, "seed": 0}
    client0 = calibration_segments(str(tmp_path), tokenizer, partition_id=0, **kwargs)
    client1 = calibration_segments(str(tmp_path), tokenizer, partition_id=1, **kwargs)
    assert decoded_letters(client0, tokenizer) <= {"a", "c", "e"}
    assert decoded_letters(client1, tokenizer) <= {"b", "d"}
    assert len(decoded_letters(client0, tokenizer)) >= 2  # 20 draws do not all land in one file


def test_iid_shards_are_slices_of_one_pooled_draw(tokenizer, tmp_path: Path):
    write_letter_documents(tmp_path, 2)  # fewer documents than clients is fine for iid
    common = {"seqlen": 24, "partition": "iid", "seed": 5}
    one_draw = calibration_segments(
        str(tmp_path), tokenizer, num_segments=12, num_partitions=1, **common
    )
    shards = [
        calibration_segments(
            str(tmp_path), tokenizer, num_segments=4, partition_id=k, num_partitions=3, **common
        )
        for k in range(3)
    ]
    for k, shard in enumerate(shards):
        assert torch.equal(shard, one_draw[4 * k : 4 * (k + 1)])
    pooled = pooled_segments(str(tmp_path), tokenizer, num_segments=4, num_partitions=3, **common)
    assert torch.equal(pooled, torch.cat(shards))
    assert torch.equal(pooled, one_draw)


def test_pooled_segments_by_document_is_every_clients_shard(tokenizer, tmp_path: Path):
    write_letter_documents(tmp_path, 4)
    common = {"seqlen": 16, "num_segments": 3, "seed": 2}
    pooled = pooled_segments(str(tmp_path), tokenizer, num_partitions=2, **common)
    shards = [
        calibration_segments(str(tmp_path), tokenizer, partition_id=k, num_partitions=2, **common)
        for k in range(2)
    ]
    assert pooled.shape == (6, 16)
    assert torch.equal(pooled, torch.cat(shards))


def test_eval_tokens_are_the_held_out_topics(tokenizer):
    tokens = eval_tokens("python-docs", tokenizer)
    expected = tokenize(load_documents("python-docs", split="eval"), tokenizer)
    assert torch.equal(tokens, expected)
    train = tokenize(load_documents("python-docs", split="train"), tokenizer)
    assert 0.15 < tokens.numel() / (tokens.numel() + train.numel()) < 0.35  # about 23 %
